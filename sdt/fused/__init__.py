"""The fused PEFT training path for Mamba mixers: Mamba-1 (transformers' ``MambaMixer`` and ``JambaMambaMixer``) and
Mamba-2 (``Mamba2Mixer``).

transformers' CUDA path hands the effective weights to mamba-ssm's ``mamba_inner_fn``, whose backward computes the
full gradients of x_proj, dt_proj and out_proj whatever trains, around layout copies that take about a quarter of
the step (issue 14). :func:`install_fused_path` routes each mixer's training forward through
:class:`~.inner.MambaInnerFn` instead: the same kernels, called in the layouts they want, and only the gradients
that some trainable tensor needs (LoRA on in_proj / out_proj in activation space). The adapters stay in weight
space: merge, save and the coverage guard see no difference, and everything but a cache-free training forward
(evaluation, generation, a CPU model) runs transformers' own forward.

Mamba-2 mixers keep mamba-ssm's combined kernel (``mamba_split_conv1d_scan_combined``) and move only the projections
around it into activation space (:mod:`.mamba2`): no copy of W0 + Δ and no gradient of in_proj's or out_proj's weight.
On the same path the Linear layers beside the mixers (a hybrid's attention and MLP) run their LoRA in activation space
too (:mod:`.linear`).

    tuner = sdt.apply(model, cfg)
    install_fused_path(model)          # logs e.g. "fused path: 48 MambaMixers on sdt.fused.MambaInnerFn (...)"
    ...
    uninstall_fused_path(model)        # before merging, or to compare with transformers' path
"""

from ..compat.mamba_ssm import CudaKernels, CudaMamba2Kernels, load_cuda_kernels
from .inner import MambaInnerFn
from .install import install_fused_path, mamba1_mixers, mamba2_mixers, uninstall_fused_path
from .kernels import Mamba2Kernels, MambaKernels
from .mamba2 import keeps_packed_examples_apart

__all__ = [
    "CudaKernels",
    "CudaMamba2Kernels",
    "Mamba2Kernels",
    "MambaInnerFn",
    "MambaKernels",
    "install_fused_path",
    "keeps_packed_examples_apart",
    "load_cuda_kernels",
    "mamba1_mixers",
    "mamba2_mixers",
    "uninstall_fused_path",
]
