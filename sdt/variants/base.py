"""What a LoRA variant is (:class:`LoraVariant`) and the registry the variant files add themselves to."""

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

__all__ = ["VARIANTS", "AdapterFactory", "LoraVariant", "get_variant", "register_variant"]
