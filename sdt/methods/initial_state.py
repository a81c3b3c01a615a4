"""Initial-state tuning, State-offset Tuning's baseline (arXiv 2503.03499; docs/method.md §9): every mixer's scan
starts from a trained state instead of zero. LoRA may be added (``lora_targets``), as the paper's code allows."""

from .base import Method, register_method

register_method(
    Method(
        name="initial-state",
        title="initial-state tuning",
        baseline="lora",
        summary="a trained initial state for every mixer's scan",
        lora="optional",
        sdt="none",
        state="initial",
        defaults={"lora_targets": (), "sdt_targets": ()},
    )
)
