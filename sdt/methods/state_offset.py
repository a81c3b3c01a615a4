"""State-offset Tuning (Kang et al., arXiv 2503.03499; docs/method.md §9): a trained offset h' added to every
mixer's state where the output reads it, at every step. LoRA may be added (``lora_targets``); the paper's runs train
h' alone."""

from .base import Method, register_method

register_method(
    Method(
        name="state-offset",
        title="State-offset Tuning",
        baseline="lora",
        summary="a trained offset to every mixer's state, added at every step",
        lora="optional",
        sdt="none",
        state="offset",
        defaults={"lora_targets": (), "sdt_targets": ()},
    )
)
