"""Full fine-tuning: the baseline every PEFT method is measured against."""

from .base import Method, register_method

register_method(
    Method(
        name="full",
        title="full fine-tuning",
        summary="every weight of the model",
        lora="none",
        sdt="none",
        trains_all_weights=True,
        defaults={"lora_targets": (), "sdt_targets": ()},
    )
)
