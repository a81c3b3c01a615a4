"""The seam between the fused Function and the compiled kernels: causal conv1d and the selective scan.

:class:`MambaKernels` fixes what the Function needs from them, in the kernels' own terms (layouts, which buffers
they write, which dtypes they return), so that a pure-PyTorch implementation with the same semantics can stand in
for the CUDA one in tests (``tests/fused_reference.py``). The real one, on mamba-ssm's and causal-conv1d's
private entry points, is :class:`sdt.compat.mamba_ssm.CudaKernels`.

Layouts: every (batch, channels, length) tensor must have stride 1 along length; batch and channel strides are
free. The kernels allocate their outputs with ``empty_like`` of an input, so an output has that input's layout;
the Function relies on this to keep every activation in (channels, batch · length) memory without copies.
"""

from __future__ import annotations

from typing import Protocol

import torch


class MambaKernels(Protocol):
    """Causal depthwise conv1d with SiLU, and the selective scan with softplus(delta + bias) and a SiLU(z) gate."""

    #: the device type these kernels run on; None: any (a reference implementation)
    device_type: str | None
    name: str

    def conv1d_fwd(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """SiLU(causal_conv1d(x)): x (b, c, l), weight (c, width); returns ``empty_like(x)`` filled."""
        ...

    def conv1d_bwd(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dout: torch.Tensor, dx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Writes d(input) into ``dx`` (same shape as x, stride 1 along l); returns (dweight, dbias) in the
        weight's dtype."""
        ...

    # fmt: off
    def scan_fwd(
        self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
        z: torch.Tensor, delta_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        # fmt: on
        """(out, saved, out_z): u, delta, z (b, d, l); A (d, n) fp32; B, C (b, 1, n, l); D, delta_bias (d,) fp32.

        ``out`` = y + D·u (``empty_like(delta)``), ``out_z`` = out · SiLU(z) (``empty_like(z)``), ``saved``: what
        :meth:`scan_bwd` needs besides the inputs (the CUDA kernel's chunk states).
        """
        ...

    # fmt: off
    def scan_bwd(
        self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
        z: torch.Tensor, delta_bias: torch.Tensor, dout: torch.Tensor, saved: torch.Tensor | None, out: torch.Tensor,
        dz: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        # fmt: on
        """(du, ddelta, dA, dB, dC, dD, ddelta_bias, out_z) for the gradient ``dout`` of out_z; writes d(z) into
        ``dz``. du / ddelta are ``empty_like`` of u / delta, dB / dC have B's / C's dtype and layout, dA, dD,
        ddelta_bias are fp32; out_z is recomputed (``empty_like(out)``)."""
        ...

    def last_state(self, saved: torch.Tensor | None) -> torch.Tensor:
        """The scan's state after the last step, (b, d, n) fp32, from what :meth:`scan_fwd` saved."""
        ...


class Mamba2Kernels(Protocol):
    """A Mamba-2 mixer from in_proj's output to out_proj's input, as mamba-ssm's ``mamba_split_conv1d_scan_combined``
        computes it without its out_proj: the causal conv (SiLU) over [x | B | C], the chunked SSD scan with
        softplus(dt + dt_bias) clamped to ``dt_limit`` and the D skip, then the gated RMSNorm ``norm(y · SiLU(z))`` over
        groups of ``dim / ngroups`` channels (transformers' ``norm_before_gate=False``). Differentiable in every input.

    ``seq_idx`` (b, l) int32, where given, numbers the examples packed into each row (0, 0, 0, 1, 1, 2, ...): the conv
    reads no position of another example and the scan starts each example from a zero state, so every example's output
    is what it would be alone in a row of its own."""

    #: the device type these kernels run on; None: any (a reference implementation)
    device_type: str | None
    name: str

    # fmt: off
    def split_conv1d_scan(
        self, zxbcdt: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
        A: torch.Tensor, D: torch.Tensor, chunk_size: int, dt_limit: tuple[float, float], norm_weight: torch.Tensor,
        norm_eps: float, headdim: int, ngroups: int, final_state: bool, seq_idx: torch.Tensor | None = None,
        initial_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # fmt: on
        """zxbcdt (b, l, 2·dim + 2·ngroups·N + H); conv_weight (dim + 2·ngroups·N, width); A, dt_bias, D (H,) with A
        fp32; norm_weight (dim,). Returns (y, state): y (b, l, dim) in zxbcdt's dtype; the scan's final state
        (b, H, headdim, N) where ``final_state`` asks for it, else None (asked for, it costs a little).
        ``initial_states`` (b, H, headdim, N) fp32: the state the scan starts from (None: zero), differentiable;
        ``norm_weight`` None: no norm, y is the gated ``(scan + D x) · SiLU(z)``."""
        ...
