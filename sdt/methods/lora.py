"""LoRA alone, in weight space. The spec's matched-budget baselines (5.2) use ranks 2/3/5 on these modules; r=8 is
the common default."""

from .base import Method, register_method

register_method(
    Method(
        name="lora",
        title="LoRA",
        summary="LoRA on the projections only",
        lora="required",
        sdt="none",
        defaults={"lora_targets": ("x_proj", "dt_proj", "out_proj"), "sdt_targets": ()},
    )
)
