"""SDLoRA, the paper's method (docs/method.md §1): SDT on A_log and the B/C weights of the selected channels, LoRA r=8,
alpha=8 on out_proj, 500 warmup steps (the config's defaults)."""

from .base import Method, register_method

register_method(
    Method(
        name="sdlora",
        title="SDLoRA",
        baseline="lora",
        summary="SDT on the most-updated SSM channels and states, plus LoRA on the projections",
        lora="optional",
        sdt="required",
    )
)
