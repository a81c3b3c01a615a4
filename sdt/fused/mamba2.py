"""The training forward of a Mamba-2 mixer (transformers' ``Mamba2Mixer``) on the fused path.

transformers' training forward hands ``in_proj(h)`` and the effective out_proj weight to mamba-ssm's
``mamba_split_conv1d_scan_combined``. With adapters in weight space that costs, at every step, a copy of each
adapted weight (``W0 + Δ``) and the full gradient of in_proj's and out_proj's weights, which autograd then carries on
to the adapters. Here the two projections run in activation space around the same kernel, called without its
out_proj (:mod:`.projections`): LoRA as ``W0 x + s · B (A x)``, SDT's B/C-row delta as ``Δ x`` added to those rows'
outputs; neither W0 is copied and neither gets a gradient. conv1d, dt_bias, A_log, D and the norm are read through
their parametrizations as transformers reads them.

As on the Mamba-1 path (:mod:`.mixer`), only a training forward that starts from no state is taken over: no cache, or
a cache that holds nothing yet for this layer (``Mamba2ForCausalLM`` builds one in training, since its config says
``use_cache``; transformers then runs its unfused chunked scan), whose conv input and final state it records as
transformers does. Evaluation, generation steps that continue from a state and any call this forward does not
recognise run the class's own forward, unchanged. The padding mask is applied where transformers' kernel path
applies it: to the mixer's input.

Packed rows: the model's forward takes a ``seq_idx`` keyword ((batch, length) int32, numbering the examples of each
row), which a pre-hook on the model takes out of the call (transformers' forward would drop it, as 5.17's
``Mamba2ForCausalLM`` does, or refuse it on its PyTorch path, as 5.25's does) and hands to the fused mixers, which
pass it to the kernels (:class:`.kernels.Mamba2Kernels`). The mixers keep it until the model's next forward, so a
backward that recomputes a checkpointed forward sees it too. A mixer with a ``seq_idx`` that cannot take the fused
path, or a model whose mixers left it, is an error, never a silent mix of examples;
:func:`keeps_packed_examples_apart` says whether a model's training forward can take packed rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compat.transformers import mixer_cache
from .kernels import Mamba2Kernels
from .mixer import record_in_cache, takes_fused_path
from .projections import project_tokens_first, projection

KERNELS_ATTRIBUTE = "_sdt_fused_mamba2_kernels"
SEQ_IDX = "seq_idx"
PACKED_ATTRIBUTE = "_sdt_seq_idx"  # on a fused mixer: the seq_idx of its model's latest forward, or None
HANDOFF_ATTRIBUTE = "_sdt_seq_idx_handoff"  # on the model: its SeqIdxHandoff, whose pre-hook hands seq_idx on


def fused_forward(
    mixer: nn.Module,
    kernels: Mamba2Kernels,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Any | None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """What transformers' ``Mamba2Mixer`` computes in training from no state, adapters in activation space."""
    batch, length, hidden = hidden_states.shape
    if attention_mask is not None:
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    zxbcdt = project_tokens_first(hidden_states.reshape(batch * length, hidden), projection(mixer.in_proj))
    zxbcdt = zxbcdt.view(batch, length, -1)
    y, final_state = kernels.split_conv1d_scan(
        zxbcdt,
        mixer.conv1d.weight.squeeze(1),
        mixer.conv1d.bias,
        mixer.dt_bias,
        -torch.exp(mixer.A_log.float()),
        mixer.D,
        mixer.chunk_size,
        tuple(mixer.time_step_limit),
        mixer.norm.weight,
        mixer.norm.variance_epsilon,
        mixer.head_dim,
        mixer.n_groups,
        final_state=cache is not None,
        seq_idx=seq_idx,
    )
    if cache is not None:
        conv_input = zxbcdt[..., mixer.intermediate_size : mixer.intermediate_size + mixer.conv_dim]
        record_in_cache(cache, mixer, conv_input.detach().transpose(1, 2), final_state)
    out = project_tokens_first(y.reshape(batch * length, -1), projection(mixer.out_proj))
    return out.view(batch, length, -1)


def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Bound to a mixer instance by :func:`sdt.fused.install_fused_path` (see :func:`.mixer.forward` for why)."""
    kernels = self.__dict__[KERNELS_ATTRIBUTE]
    seq_idx = kwargs.pop(SEQ_IDX, None)
    if seq_idx is None:
        seq_idx = self.__dict__.get(PACKED_ATTRIBUTE)
    if takes_fused_path(self, kernels, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        cache = mixer_cache(kwargs)
        return fused_forward(self, kernels, hidden_states, kwargs.get("attention_mask"), cache, seq_idx)
    if seq_idx is not None:
        raise ValueError(
            f"{SEQ_IDX}: packed rows need the fused path's training forward (training mode, on {kernels.device_type}, "
            "no autocast, no state to continue from); transformers' forward would mix the examples of a row"
        )
    return type(self).forward(self, *args, **kwargs)


class SeqIdxHandoff:
    """The model's forward pre-hook that takes ``seq_idx`` out of each call and hands it to the fused mixers (a bound
    method, as :meth:`sdt.parametrize.SparseGroups.refresh` is, so that a deep copy of the model hooks its own)."""

    def __init__(self) -> None:
        self.mixers: list[nn.Module] = []

    def take(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        seq_idx = kwargs.pop(SEQ_IDX, None)
        if seq_idx is not None and not self.mixers:
            raise ValueError(
                f"{SEQ_IDX}: the Mamba-2 mixers are off the fused path, the one that keeps packed rows apart"
            )
        for mixer in self.mixers:
            mixer.__dict__[PACKED_ATTRIBUTE] = seq_idx
        return args, kwargs


def hand_seq_idx_to_mixers(model: nn.Module, mixers: list[nn.Module]) -> None:
    """From now on, the ``seq_idx`` of a call of ``model`` goes to ``mixers`` (the hook is added once)."""
    handoff = model.__dict__.get(HANDOFF_ATTRIBUTE)
    if handoff is None:
        handoff = model.__dict__[HANDOFF_ATTRIBUTE] = SeqIdxHandoff()
        model.register_forward_pre_hook(handoff.take, with_kwargs=True)
    handoff.mixers = mixers


def stop_handing_seq_idx(model: nn.Module, mixers: list[nn.Module]) -> None:
    """A ``seq_idx`` given to ``model`` from now on is an error: its mixers left the fused path."""
    handoff = model.__dict__.get(HANDOFF_ATTRIBUTE)
    if handoff is not None:
        handoff.mixers = []
    for mixer in mixers:
        mixer.__dict__.pop(PACKED_ATTRIBUTE, None)


def keeps_packed_examples_apart(model: nn.Module) -> bool:
    """Whether ``model``'s training forward, given ``seq_idx``, computes each packed example as if it were alone: a
    Mamba-2 model (every layer a Mamba-2 mixer, nothing else mixing positions) whose mixers are on the fused path."""
    config = getattr(model, "config", None)
    fused = [m for m in model.modules() if KERNELS_ATTRIBUTE in m.__dict__]
    handoff = model.__dict__.get(HANDOFF_ATTRIBUTE)
    return (
        handoff is not None
        and bool(handoff.mixers)
        and getattr(config, "model_type", None) == "mamba2"
        and len(fused) == config.num_hidden_layers
    )
