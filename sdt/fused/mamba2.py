"""The training forward of a Mamba-2 mixer (transformers' ``Mamba2Mixer`` and the hybrids' mixers) on the fused path.

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
transformers does. Evaluation (except of a mixer with a state adapter), generation steps that continue from a state and
any call this forward does not recognise run the class's own forward, unchanged (:func:`sdt.state.forward` for a
mixer with a state adapter). The padding mask is applied where transformers' kernel path applies it: to the mixer's
input.

A state adapter (:mod:`sdt.state`) enters as the kernel's ``initial_states`` (an initial state) or, for an offset,
beside the kernel: called without its norm, the kernel returns the gated scan output, the offset's gated term is added
to it and the mixer's gated RMSNorm applied after.

Packed rows: the model's forward takes a ``seq_idx`` keyword ((batch, length) int32, numbering the examples of each
row), which a pre-hook on the model takes out of the call (transformers' forward would drop it, as 5.17's
``Mamba2ForCausalLM`` does, or refuse it on its PyTorch path, as 5.25's does) and hands to the fused mixers, which
pass it to the kernels (:class:`.kernels.Mamba2Kernels`). The mixers keep it until the model's next forward, so a
backward that recomputes a checkpointed forward sees it too. A mixer with a ``seq_idx`` that cannot take the fused
path, or a model whose mixers left it, is an error, never a silent mix of examples;
:func:`keeps_packed_examples_apart` says whether a model's training forward can take packed rows. A state adapter
refuses packed rows: the kernel would start every example but the first from zero, not h⁰, and an offset's C,
recomputed beside the kernel, would see the example before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compat.transformers import mixer_cache
from ..state import mamba2_offset_term, state_adapter, unfused_forward
from ..targets import family_of, mixers
from .kernels import Mamba2Kernels
from .mixer import record_in_cache, takes_fused_path
from .prefix import NO_STEP
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
    # Falcon-H1's µP multipliers scale in_proj's input and each block of its output, adapters included, as there
    if (in_multiplier := getattr(mixer, "ssm_in_multiplier", None)) is not None:
        hidden_states = hidden_states * in_multiplier
    zxbcdt = project_tokens_first(hidden_states.reshape(batch * length, hidden), projection(mixer.in_proj))
    zxbcdt = zxbcdt.view(batch, length, -1)
    if (mup_vector := getattr(mixer, "mup_vector", None)) is not None:
        zxbcdt = zxbcdt * mup_vector
    state = state_adapter(mixer)
    if state is not None and seq_idx is not None:
        raise ValueError(f"{SEQ_IDX}: packed rows with a state {state.kind}: each example would not start from it")
    offset = state is not None and state.kind == "offset"
    initial = None
    if state is not None and state.kind == "initial":  # the kernel's own initial state, one copy per sequence
        value = state()
        initial = value[None].expand(batch, *value.shape).contiguous()
        if attention_mask is not None:  # a pad takes no step (Δ = softplus(NO_STEP) = 0): h⁰ reaches the first token
            heads = mixer.num_heads
            dt = zxbcdt[..., -heads:].masked_fill(attention_mask[..., None] == 0, NO_STEP)
            zxbcdt = torch.cat([zxbcdt[..., :-heads], dt], dim=-1)
    # the offset's term goes in before the gated norm, which then runs here; Falcon-H1 may have no gated norm: the
    # kernel then only gates
    norm_weight = None if offset else getattr(mixer.norm, "weight", None)
    y, final_state = kernels.split_conv1d_scan(
        zxbcdt,
        mixer.conv1d.weight.squeeze(1),
        mixer.conv1d.bias,
        mixer.dt_bias,
        -torch.exp(mixer.A_log.float()),
        mixer.D,
        mixer.chunk_size,
        tuple(mixer.time_step_limit),
        norm_weight,
        None if norm_weight is None else mixer.norm.variance_epsilon,
        mixer.head_dim,
        mixer.n_groups,
        final_state=cache is not None,
        seq_idx=seq_idx,
        initial_states=initial,
    )
    if offset:
        y = mixer.norm(y.float() + _offset_term(mixer, zxbcdt, state())).to(zxbcdt.dtype)
    if cache is not None:
        conv_input = zxbcdt[..., mixer.intermediate_size : mixer.intermediate_size + mixer.conv_dim]
        record_in_cache(cache, mixer, conv_input.detach().transpose(1, 2), final_state)
    out = project_tokens_first(y.reshape(batch * length, -1), projection(mixer.out_proj))
    return out.view(batch, length, -1)


def _offset_term(mixer: nn.Module, zxbcdt: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``SiLU(z_t) · Σ_n h'[h, p, n] C_t[g(h), n]`` (b, l, dim) fp32, with C_t recomputed beside the kernel: the causal
    conv over C's channels alone, a sliver of the conv's."""
    batch, length, _ = zxbcdt.shape
    dim, width, c_size = mixer.intermediate_size, mixer.n_groups * mixer.ssm_state_size, mixer.conv1d.weight.shape[-1]
    c_rows = slice(mixer.conv_dim - width, mixer.conv_dim)  # C is the last block of the conv's channels
    c_in = zxbcdt[..., dim + c_rows.start : dim + c_rows.stop].transpose(1, 2)
    bias = None if mixer.conv1d.bias is None else mixer.conv1d.bias[c_rows]
    C = F.silu(F.conv1d(c_in, mixer.conv1d.weight[c_rows], bias, padding=c_size - 1, groups=width)[..., :length])
    term = mamba2_offset_term(offset, C.transpose(1, 2).reshape(batch, length, mixer.n_groups, -1))
    return term.reshape(batch, length, dim) * F.silu(zxbcdt[..., :dim].float())


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
    return unfused_forward(self, *args, **kwargs)


class SeqIdxHandoff:
    """The model's forward pre-hook that takes ``seq_idx`` out of each call and hands it to the fused mixers (a bound
    method, as :meth:`sdt.parametrize.SparseGroups.refresh` is, so that a deep copy of the model hooks its own).

    A packed row is a training forward without a cache (a cache stops transformers from building a packed mask, and
    there is nothing to continue from). A hybrid whose attention keeps packed examples apart (``packed_attention``
    of its family) also gets position ids that restart at each example: transformers' mask then lets a position
    attend only within its example, and rotary embeddings count from each example's start."""

    def __init__(self) -> None:
        self.mixers: list[nn.Module] = []
        self.positions = False  # a hybrid: its attention needs position ids to keep the examples apart
        self.attention_mixes: str | None = None  # a hybrid whose attention cannot keep them apart: its model type

    def take(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        seq_idx = kwargs.pop(SEQ_IDX, None)
        if seq_idx is not None and not self.mixers:
            raise ValueError(
                f"{SEQ_IDX}: the Mamba-2 mixers are off the fused path, the one that keeps packed rows apart"
            )
        if seq_idx is not None and self.attention_mixes:
            raise ValueError(
                f"{SEQ_IDX}: {self.attention_mixes}'s attention would mix the examples of a packed row (its model "
                "does not give position ids to transformers' mask); use grouped batches"
            )
        for mixer in self.mixers:
            mixer.__dict__[PACKED_ATTRIBUTE] = seq_idx
        if seq_idx is not None:
            kwargs["use_cache"] = False
            if self.positions:
                kwargs.setdefault("position_ids", packed_positions(seq_idx))
        return args, kwargs


def packed_positions(seq_idx: torch.Tensor) -> torch.Tensor:
    """Each position's offset from its example's first token in a packed row: (b, l) ``seq_idx`` 0, 0, 0, 1, 1, 2
    gives 0, 1, 2, 0, 1, 0 (on the device, no wait for it)."""
    index = torch.arange(seq_idx.shape[-1], device=seq_idx.device).expand_as(seq_idx)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=-1).values


def hand_seq_idx_to_mixers(model: nn.Module, mixers: list[nn.Module]) -> None:
    """From now on, the ``seq_idx`` of a call of ``model`` goes to ``mixers`` (the hook is added once)."""
    handoff = model.__dict__.get(HANDOFF_ATTRIBUTE)
    if handoff is None:
        handoff = model.__dict__[HANDOFF_ATTRIBUTE] = SeqIdxHandoff()
        model.register_forward_pre_hook(handoff.take, with_kwargs=True)
    handoff.mixers = mixers
    family = family_of(model)
    handoff.positions = bool(family.layer_types)
    handoff.attention_mixes = None if family.packed_attention else model.config.model_type


def stop_handing_seq_idx(model: nn.Module, mixers: list[nn.Module]) -> None:
    """A ``seq_idx`` given to ``model`` from now on is an error: its mixers left the fused path."""
    handoff = model.__dict__.get(HANDOFF_ATTRIBUTE)
    if handoff is not None:
        handoff.mixers = []
    for mixer in mixers:
        mixer.__dict__.pop(PACKED_ATTRIBUTE, None)


def keeps_packed_examples_apart(model: nn.Module) -> bool:
    """Whether ``model``'s training forward, given ``seq_idx``, computes each packed example as if it were alone: a
    Mamba-2 model or a hybrid whose attention keeps packed examples apart (``packed_attention`` of its family: Bamba,
    Nemotron-H, Falcon-H1, Zamba2), every Mamba-2 mixer on the fused path, none carrying a state adapter."""
    fused = [m for m in model.modules() if KERNELS_ATTRIBUTE in m.__dict__]
    handoff = model.__dict__.get(HANDOFF_ATTRIBUTE)
    if handoff is None or not handoff.mixers:
        return False
    family = family_of(model)
    return family.packed_attention and len(fused) == len(mixers(model)) and not any(state_adapter(m) for m in fused)
