"""SDT alone: the sparse SSM deltas of SDLoRA without any LoRA."""

from .base import Method, register_method

register_method(
    Method(
        name="sdt",
        title="SDT",
        summary="SDT on the most-updated SSM channels and states only",
        lora="none",
        sdt="required",
        defaults={"lora_targets": ()},
    )
)
