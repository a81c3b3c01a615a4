"""DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024), in weight space.

The weight is split into a magnitude per output feature and a direction: W' = m · (W0 + s·B@A) / ‖W0 + s·B@A‖,
the norm taken over each output row, m initialised to ‖W0‖ of the rows, B to zero, so W' = W0 at the start.
PEFT detaches the norm to save memory (the paper's section 4.3); here it is the exact function, since the
effective weight is formed once per step anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from ..parametrize import Adapter, low_rank_factors
from .base import LoraVariant, register_variant


class WeightDecomposedDelta(Adapter):
    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.lora_A, self.lora_B = low_rank_factors(weight, rank, generator)
        self.magnitude = nn.Parameter(weight.detach().float().norm(dim=1))
        self.scaling = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        direction = weight.float() + self.scaling * (self.lora_B @ self.lora_A)
        return ((self.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction).to(weight.dtype)


register_variant(
    LoraVariant(name="dora", summary="magnitude · direction(W0 + (alpha/r)·BA)", build=WeightDecomposedDelta)
)
