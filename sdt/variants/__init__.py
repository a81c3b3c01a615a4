"""The LoRA variant seam: how a LoRA adapter turns its factors into an effective weight, one small file each.

Every variant is a weight-space parametrization (:class:`sdt.parametrize.Adapter`), so the fused kernels, merge,
save/load and the coverage guard work for it unchanged. A new variant (:class:`LoraVariant`, in
:mod:`sdt.variants.base`) is one file here plus one line in this module's imports; ``SDTConfig(lora_variant=...)``
selects it, and so does ``method.lora_variant`` in a job spec.
"""

from __future__ import annotations

from .base import VARIANTS, LoraVariant, get_variant, register_variant

# isort: split
from . import dora, lora  # noqa: F401  (registration happens on import)

__all__ = ["VARIANTS", "LoraVariant", "get_variant", "register_variant"]
