"""DeepSpeed's mark on the parameters ZeRO-3 partitions, read without importing DeepSpeed (sdt never does)."""

from __future__ import annotations

import torch


def partitioned_by_zero3(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``parameter``: it gives every parameter it converts a ``ds_id``, which
    its own ``deepspeed.runtime.zero.partition_parameters.is_zero_param`` reads; calling that would import DeepSpeed
    into sdt."""
    return hasattr(parameter, "ds_id")
