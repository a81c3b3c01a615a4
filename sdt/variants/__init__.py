"""The LoRA variant seam: how a LoRA adapter turns its factors into an effective weight, one small file each.

Every variant is a weight-space parametrization (:class:`sdt.parametrize.Adapter`), so the fused kernels, merge,
save/load and the coverage guard work for it unchanged. A new variant is one file here plus one line in this
module's imports; ``SDTConfig(lora_variant=...)`` selects it, and so does ``method.lora_variant`` in a job spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..parametrize import Adapter
from ..registry import Registry

# (weight, rank, alpha, generator) -> the parametrization that adapts ``weight``
AdapterFactory = Callable[[torch.Tensor, int, float, torch.Generator], Adapter]


@dataclass(frozen=True)
class LoraVariant:
    name: str
    summary: str  # one line, for help texts and model cards
    build: AdapterFactory


VARIANTS: Registry[LoraVariant] = Registry("lora_variant")
register_variant = VARIANTS.register
get_variant = VARIANTS.lookup


from . import dora, lora  # noqa: E402,F401  (registration happens on import)

__all__ = ["VARIANTS", "LoraVariant", "get_variant", "register_variant"]
