"""transformers' internals that sdt reads, and accelerate's mark on a hooked module (transformers' device maps and
offloading put accelerate's hooks on a model)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from . import CompatError, require

# The keyword arguments a Mamba-1 mixer's forward gets from its block (MambaBlock, JambaMambaDecoderLayer):
# transformers 5.17 names the cache `cache_params`, 5.24 `cache`.
# The Mamba-2 hybrids' layers pass on what their mixer ignores: Zamba2 the rotary embeddings of its shared
# attention, Granite-4.0-H its MoE's router-logits flag.
MIXER_ARGUMENTS = frozenset(
    {"hidden_states", "attention_mask", "cache", "cache_params", "position_embeddings", "output_router_logits"}
)
# Trainer's loaders of model weights, with the parameters sdt's replacements take.
TRAINER_LOADERS = {"_load_from_checkpoint": ("resume_from_checkpoint", "model"), "_load_best_model": ()}


def mixer_cache(kwargs: dict[str, Any]) -> Any | None:
    """The cache a mixer's forward was given (:data:`MIXER_ARGUMENTS`), under either name."""
    cache = kwargs.get("cache")
    return kwargs.get("cache_params") if cache is None else cache


def recurrent_state(cache: Any, layer_idx: int) -> Any | None:
    """The scan state a cache holds for a layer, or None before the layer's first update. transformers 5.24's caches
    have ``get_recurrent_state``; 5.17's (Jamba's ``DynamicCache``, handed even to a training forward) only the
    layer's ``recurrent_states`` and ``has_previous_state``."""
    if hasattr(cache, "get_recurrent_state"):
        return cache.get_recurrent_state(layer_idx)
    layer = require(cache, "layers", "transformers", f"{type(cache).__name__}.layers")[layer_idx]
    if not hasattr(layer, "recurrent_states") or not hasattr(layer, "has_previous_state"):
        raise CompatError("transformers", f"{type(layer).__name__}", "holds no recurrent state")
    return layer.recurrent_states[0] if layer.has_previous_state[0] else None


def checkpoint_loaders(trainer: Any) -> tuple[Callable[..., None], Callable[[], None]]:
    """Trainer's own loading of model weights: ``_load_from_checkpoint(resume_from_checkpoint, model=None)`` when it
    resumes, ``_load_best_model()`` for ``load_best_model_at_end``. Private methods: Trainer knows PEFT's adapters
    there and has no hook for a model whose checkpoints hold anything else."""
    loaders = []
    for name, parameters in TRAINER_LOADERS.items():
        loader = require(trainer, name, "transformers", "transformers.Trainer")
        found = tuple(inspect.signature(loader).parameters)
        if found != parameters:
            raise CompatError("transformers", f"transformers.Trainer.{name}", f"takes {found}, not {parameters}")
        loaders.append(loader)
    load_from_checkpoint, load_best_model = loaders
    return load_from_checkpoint, load_best_model


@contextlib.contextmanager
def checkpoint_loaders_replaced(
    trainer: Any, load_from_checkpoint: Callable[..., None], load_best_model: Callable[[], None]
) -> Iterator[None]:
    """Trainer's two loaders (:func:`checkpoint_loaders`) replaced inside the block: instance attributes, which
    Trainer reaches through ``self``, removed afterwards."""
    trainer._load_from_checkpoint, trainer._load_best_model = load_from_checkpoint, load_best_model
    try:
        yield
    finally:
        del trainer._load_from_checkpoint, trainer._load_best_model


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` belongs to a model transformers quantized: its quantizers mark the model's config
    ``_is_quantized`` (transformers.quantizers.base), which a submodule sharing the config sees; the public
    ``PreTrainedModel.is_quantized`` is out of a submodule's reach."""
    return hasattr(getattr(module, "config", None), "_is_quantized")


def has_accelerate_hooks(module: nn.Module) -> bool:
    """Whether accelerate's hooks (offloaded weights, a device map) sit on ``module`` or below it: accelerate marks
    a hooked module with ``_hf_hook`` (``accelerate.hooks.add_hook_to_module``) and has no public query for it."""
    return any(hasattr(m, "_hf_hook") for m in module.modules())
