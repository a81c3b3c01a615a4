"""Standard LoRA (Hu et al.): W0 + (alpha / rank) · B @ A, A kaiming-uniform and B zero, as PEFT initialises it."""

from ..parametrize import LowRankDelta
from .base import LoraVariant, register_variant

register_variant(
    LoraVariant(
        name="lora",
        summary="W0 + (alpha/r)·BA",
        build=lambda weight, rank, alpha, generator: LowRankDelta(weight, rank, alpha / rank, generator),
    )
)
