"""LoRA alone, in weight space, on the family's LoRA-baseline modules unless told where (``lora_targets`` None:
Mamba-1's x_proj, dt_proj and out_proj, as the spec's matched-budget baselines (5.2) at ranks 2/3/5; Mamba-2's
in_proj and out_proj). r=8 is the common default."""

from .base import Method, register_method

register_method(
    Method(
        name="lora",
        title="LoRA",
        summary="LoRA on the projections only",
        lora="required",
        sdt="none",
        defaults={"lora_targets": None, "sdt_targets": ()},
    )
)
