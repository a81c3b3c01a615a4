"""The training forward of a Mamba-1 mixer (transformers' ``MambaMixer`` / ``JambaMambaMixer``) on the fused path.

Only a training forward that starts from no state is taken over: no cache, or a cache that holds nothing yet for
this layer (Jamba builds one in every forward, training included, since its config says ``use_cache``); the
forward then records the conv and SSM states in it as transformers does. Evaluation (except of a mixer with a
state adapter, :mod:`sdt.state`), generation steps that continue from a state and any call this forward does not
recognise go to the class's own forward, unchanged (a mixer with a state adapter: :func:`sdt.state.forward`).
The adapters are read at every call (see :mod:`.projections`), so the path stays right when the tuner swaps
them (warmup -> training, merge).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..compat.transformers import MIXER_ARGUMENTS, mixer_cache
from ..state import state_adapter, unfused_forward
from .inner import MambaInnerFn, as_batched
from .kernels import MambaKernels
from .projections import project_channels_first, projection

KERNELS_ATTRIBUTE = "_sdt_fused_kernels"


def fused_forward(
    mixer: nn.Module,
    kernels: MambaKernels,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Any | None,
) -> torch.Tensor:
    """What transformers' mixer forward computes in training without a cache, on :class:`MambaInnerFn`."""
    batch, length, hidden = hidden_states.shape
    dtype = hidden_states.dtype
    token_mask = None
    if attention_mask is not None:  # transformers masks padding before in_proj and again after the conv
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(dtype)
        token_mask = attention_mask[:, None, :].to(dtype)
    xz = project_channels_first(hidden_states.reshape(batch * length, hidden), projection(mixer.in_proj))
    out = projection(mixer.out_proj)
    lora = out.lora
    if hasattr(mixer, "dt_layernorm"):  # Jamba
        norms = (mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm)
        norm_weights = tuple(n.weight for n in norms)
        norm_eps = tuple(n.variance_epsilon for n in norms)
    else:
        norm_weights, norm_eps = (None, None, None), (0.0, 0.0, 0.0)
    record_state = None if cache is None else functools.partial(record_in_cache, cache, mixer)
    state = state_adapter(mixer)
    return MambaInnerFn.apply(
        as_batched(xz, batch),
        mixer.conv1d.weight,
        mixer.conv1d.bias,
        mixer.x_proj.weight,
        mixer.dt_proj.weight,
        mixer.dt_proj.bias.float(),
        -torch.exp(mixer.A_log.float()),
        mixer.D.float(),
        out.weight,
        out.bias,
        None if lora is None else lora.lora_A,
        None if lora is None else lora.lora_B,
        0.0 if lora is None else lora.scaling,
        *norm_weights,
        norm_eps,
        token_mask,
        record_state,
        kernels,
        None if state is None else state.kind,
        None if state is None else state(),
    )


def record_in_cache(cache: Any, mixer: nn.Module, x: torch.Tensor, last_state: torch.Tensor) -> None:
    """What transformers' mixer keeps in a fresh cache: the conv input's tail and the scan's final state."""
    cache.update_conv_state(x, mixer.layer_idx, conv_kernel_size=mixer.conv_kernel_size)
    cache.update_recurrent_state(last_state, mixer.layer_idx)


def takes_fused_path(mixer: nn.Module, kernels: MambaKernels, args: tuple, kwargs: dict[str, Any]) -> bool:
    """A forward from no state; in evaluation without a cache too where the mixer carries a state adapter (its
    only other forward is :func:`sdt.state.forward`'s step-by-step scan, which a prompt for generation takes: it
    keeps left padding exact)."""
    evaluating_state = not mixer.training and state_adapter(mixer) is not None and mixer_cache(kwargs) is None
    if not (mixer.training or evaluating_state) or len(args) > 1 or not MIXER_ARGUMENTS.issuperset(kwargs):
        return False
    cache = mixer_cache(kwargs)
    if cache is not None and (not hasattr(cache, "has_previous_state") or cache.has_previous_state(mixer.layer_idx)):
        return False
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    if hidden_states is None:
        return False
    device_type = hidden_states.device.type
    if kernels.device_type is not None and device_type != kernels.device_type:
        return False
    return not torch.is_autocast_enabled(device_type)


def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Bound to a mixer instance by :func:`sdt.fused.install_fused_path` (an instance attribute, so that
    parametrize's class swaps keep it and ``copy.deepcopy`` rebinds it to the copy)."""
    kernels = self.__dict__[KERNELS_ATTRIBUTE]
    if takes_fused_path(self, kernels, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        return fused_forward(self, kernels, hidden_states, kwargs.get("attention_mask"), mixer_cache(kwargs))
    return unfused_forward(self, *args, **kwargs)
