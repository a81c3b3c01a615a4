"""DeepSpeed's internals that a trial's workers touch: its table of the ops it may build, and two parts of the
engine's stage-0 step (``pipeline.trial.worker.lighten_stage0`` says why) that its configuration cannot switch off."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdt.compat import CompatError, require

ENGINE = "deepspeed.runtime.engine.DeepSpeedEngine"


def skip_shared_memory_allreduce_build() -> None:
    """DeepSpeed's CPU accelerator will not build its shared-memory all-reduce op when its communication starts
    (``deepspeed.comm.torch.build_shm_op``, which builds only the ops its private table ``deepspeed.ops.
    __compatible_ops__`` allows; the first engine of a process reads it). A no-op on accelerators without the op."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        require(deepspeed.ops, "__compatible_ops__", "deepspeed", "deepspeed.ops")[builder.NAME] = False


def skip_backward_allreduce(engine: Any) -> None:
    """``engine``'s backward no longer all-reduces the gradients (its ``enable_backward_allreduce`` flag, which only
    its own ``no_sync`` context and pipeline parallelism set)."""
    require(engine, "enable_backward_allreduce", "deepspeed", ENGINE)
    engine.enable_backward_allreduce = False


def replace_gradient_clipping(engine: Any, clip: Callable[[], Any]) -> None:
    """``engine`` clips its fp32 gradients (stage 0, no mixed precision) with ``clip()`` instead of its own
    ``clip_fp32_gradients``, a method its step calls."""
    if not callable(require(engine, "clip_fp32_gradients", "deepspeed", ENGINE)):
        raise CompatError("deepspeed", f"{ENGINE}.clip_fp32_gradients", "is not a method")
    engine.clip_fp32_gradients = clip
