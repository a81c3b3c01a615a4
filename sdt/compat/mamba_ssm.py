"""mamba-ssm's and causal-conv1d's CUDA kernels as sdt's fused paths call them.

Mamba-1: called as mamba-ssm's own ``MambaInnerFn`` calls them: the selective scan's extension module
(``selective_scan_cuda``) and causal-conv1d's ``cpp_functions`` wrappers, private entry points of the shipped wheels
(mamba-ssm 2.3.2, causal-conv1d 1.7.0) with positional arguments. Their public functions compute the full gradients
and layouts that the fused path exists to avoid (:mod:`sdt.fused`). :class:`CudaKernels` keeps the contract of
:class:`sdt.fused.kernels.MambaKernels`; ``tests/test_fused_cuda.py`` checks it against the pure-PyTorch reference.

Mamba-2: mamba-ssm's public ``mamba_split_conv1d_scan_combined`` (the function transformers' ``Mamba2Mixer`` calls in
training), without its out_proj, which the fused path applies itself (:class:`CudaMamba2Kernels`); its ``seq_idx``
(int32, one example number per position) keeps packed examples apart in causal-conv1d's conv and the chunked scan.
"""

from __future__ import annotations

import torch

from . import CompatError, installed_version, require


class CudaKernels:
    """mamba-ssm's selective scan and causal-conv1d's conv, called as mamba-ssm's ``MambaInnerFn`` calls them."""

    device_type = "cuda"
    name = "selective_scan_cuda + causal_conv1d_cuda"

    def __init__(self) -> None:
        import selective_scan_cuda
        from causal_conv1d import cpp_functions

        self._scan_fwd = require(selective_scan_cuda, "fwd", "mamba-ssm", "selective_scan_cuda")
        self._scan_bwd = require(selective_scan_cuda, "bwd", "mamba-ssm", "selective_scan_cuda")
        where = "causal_conv1d.cpp_functions"
        self._conv_fwd = require(cpp_functions, "causal_conv1d_fwd_function", "causal-conv1d", where)
        self._conv_bwd = require(cpp_functions, "causal_conv1d_bwd_function", "causal-conv1d", where)

    def __deepcopy__(self, memo: dict) -> CudaKernels:
        return self  # stateless; a deep-copied model keeps using the same extension modules

    def conv1d_fwd(self, x, weight, bias):
        # (x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation)
        return self._conv_fwd(x, weight, bias, None, None, None, True)

    def conv1d_bwd(self, x, weight, bias, dout, dx):
        # (x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial_states, silu)
        _, dweight, dbias, _ = self._conv_bwd(x, weight, bias, dout, None, None, None, dx, False, True)
        return dweight, dbias

    def scan_fwd(self, u, delta, A, B, C, D, z, delta_bias):
        out, saved, out_z = self._scan_fwd(u, delta, A, B, C, D, z, delta_bias, True)
        return out, saved, out_z

    def last_state(self, saved):
        return saved[:, :, -1, 1::2]  # chunk states hold (decay, state) pairs; see SelectiveScanFn

    def scan_bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, saved, out, dz):
        # the last flag recomputes out_z (out · SiLU(z)) inside the kernel instead of keeping it from forward
        du, ddelta, dA, dB, dC, dD, ddelta_bias, _, out_z = self._scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, dout, saved, out, dz, True, True
        )
        return du, ddelta, dA, dB, dC, dD, ddelta_bias, out_z


class CudaMamba2Kernels:
    """mamba-ssm's ``mamba_split_conv1d_scan_combined`` with no out_proj (:class:`sdt.fused.kernels.Mamba2Kernels`)."""

    device_type = "cuda"
    name = "mamba_split_conv1d_scan_combined"

    def __init__(self) -> None:
        from mamba_ssm.ops.triton import ssd_combined

        self._combined = require(ssd_combined, "mamba_split_conv1d_scan_combined", "mamba-ssm", "ssd_combined")

    def __deepcopy__(self, memo: dict) -> CudaMamba2Kernels:
        return self

    # fmt: off
    def split_conv1d_scan(
        self, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, dt_limit, norm_weight, norm_eps, headdim,
        ngroups, final_state, seq_idx=None, initial_states=None,
    ):
        result = self._combined(
            zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, initial_states=initial_states, seq_idx=seq_idx,
            dt_limit=dt_limit, activation="silu", rmsnorm_weight=norm_weight, rmsnorm_eps=norm_eps, headdim=headdim,
            ngroups=ngroups, norm_before_gate=False, return_final_states=final_state,
        )
        # fmt: on
        return result if final_state else (result, None)


def load_cuda_kernels(kernels_class: type = CudaKernels) -> tuple[CudaKernels | CudaMamba2Kernels | None, str]:
    """The CUDA kernels of ``kernels_class``, or None and why not (no CUDA device, mamba-ssm or causal-conv1d missing,
    or their entry points moved; the installed versions are named)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        return kernels_class(), ""
    except CompatError as moved:
        return None, f"{moved} (sdtune calls mamba-ssm 2.3.2's and causal-conv1d 1.7.0's)"
    except (ImportError, OSError) as error:  # missing, or built against another torch / CUDA
        versions = f"mamba-ssm {installed_version('mamba-ssm')} / causal-conv1d {installed_version('causal-conv1d')}"
        return None, f"{versions} kernels not importable ({error}); pip install '.[cuda]'"
