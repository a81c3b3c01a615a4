"""State-based adapters (docs/method.md §9): a trained state offset or initial state per Mamba mixer.

State-offset Tuning (Kang et al., arXiv 2503.03499) adds a trained offset ``h'`` to the state where the output reads
it, at every step: ``y_t = C_t·(h_t + h') + D x_t``, gated by ``SiLU(z_t)`` as the mixer gates ``y_t``; ``h'`` does
not enter the recurrence. Initial-state tuning, the paper's baseline, trains the state the recurrence starts from:
``h_0 = h⁰`` instead of zero. Both tensors have the shape of one sequence's SSM state: (channels, states) on Mamba-1
and Jamba, (heads, head_dim, states) on Mamba-2 (and on every family whose mixer has Mamba-2's layout).

Neither is a weight: no kernel reads them, so they cannot live in weight space as the other adapters do. A
:class:`StateAdapter` is a submodule of its mixer (``<mixer>.sdt_state``), saved, loaded and gradient-checked as every
:class:`~sdt.parametrize.Adapter` is, and its contribution enters the mixer's forward explicitly: on the fused paths
inside :mod:`sdt.fused` (CUDA), and everywhere else in :func:`forward`, this module's own PyTorch forward of the
mixer, which the tuner installs on every mixer that carries one. transformers' forward has no place where a state
offset could enter (its scan functions return the gated output), so that forward is not used for these mixers.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .compat.transformers import MIXER_ARGUMENTS, mixer_cache, recurrent_state
from .errors import SDTConfigError
from .parametrize import Adapter

ATTRIBUTE = "sdt_state"  # where a mixer holds its StateAdapter
KINDS = ("offset", "initial")


class StateAdapter(Adapter):
    """One mixer's trained state tensor, fp32, zero at the start (the paper's initialisation, so that training starts
    from the base model's outputs). ``kind``: ``offset`` (added where the output reads the state, every step) or
    ``initial`` (the state the scan starts from)."""

    def __init__(self, kind: str, shape: tuple[int, ...], device: torch.device) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
        self.kind = kind
        self.register_parameter(kind, nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device)))

    @property
    def value(self) -> torch.Tensor:
        return getattr(self, self.kind)

    def forward(self) -> torch.Tensor:
        """The tensor for a mixer's forward to use: read through this call, so that DeepSpeed ZeRO-3 gathers a
        partitioned one as it gathers a parametrization's (a copy, which outlives the gathered storage)."""
        return self.value.clone()


def is_mamba2(mixer: nn.Module) -> bool:
    """Mamba-2's layout (one A per head), which hybrid families' Mamba-2 mixers share."""
    return mixer.A_log.dim() == 1


def state_shape(mixer: nn.Module) -> tuple[int, ...]:
    """The shape of one sequence's SSM state in ``mixer``; raises for a mixer whose forward :func:`forward` does not
    reproduce (µP multipliers, a norm before the gate: Falcon-H1's)."""
    quirks = [q for q in ("mup_vector", "ssm_in_multiplier") if getattr(mixer, q, None) is not None]
    if quirks or getattr(getattr(mixer, "norm", None), "norm_before_gate", False):
        reason = f"its {', '.join(quirks)}" if quirks else "its norm before the gate"
        raise SDTConfigError("method", f"the state methods do not take {type(mixer).__name__} yet ({reason})")
    if is_mamba2(mixer):
        return (mixer.num_heads, mixer.head_dim, mixer.ssm_state_size)
    return tuple(mixer.A_log.shape)


def state_adapter(mixer: nn.Module) -> StateAdapter | None:
    return mixer._modules.get(ATTRIBUTE)


def attach(mixer: nn.Module, kind: str) -> StateAdapter:
    """Give ``mixer`` a fresh state adapter of ``kind`` and route its forwards through :func:`forward`."""
    adapter = StateAdapter(kind, state_shape(mixer), mixer.A_log.device)
    mixer.add_module(ATTRIBUTE, adapter)
    restore_forward(mixer)
    return adapter


def restore_forward(mixer: nn.Module) -> None:
    """The forward a mixer has off the fused path: this module's where it carries a state adapter, else its class's
    (an instance attribute, as the fused path's: parametrize's class swaps keep it, ``copy.deepcopy`` rebinds it)."""
    mixer.__dict__.pop("forward", None)
    if state_adapter(mixer) is not None:
        mixer.__dict__["forward"] = types.MethodType(forward, mixer)


def unfused_forward(mixer: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """What a mixer runs where the fused path does not take a call."""
    if state_adapter(mixer) is not None:
        return forward(mixer, *args, **kwargs)
    return type(mixer).forward(mixer, *args, **kwargs)


def refuse_merge(method: str, kind: str | None) -> None:
    """A state adapter has no weight to go into (docs/method.md §9): merging one fails in one line naming the method."""
    if kind is not None:
        raise SDTConfigError("method", f"{method!r} trains a state {kind}, which cannot be merged into weights")


# -- the offsets' terms, in plain autograd ops ----------------------------------------------------------------------


def mamba1_offset_term(offset: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """A Mamba-1 state offset's addition to the scan's output before the gate, (b, E, l) fp32:
    ``Σ_n h'[e, n] C_t[n]`` with C (b, N, l)."""
    return torch.einsum("en,bnl->bel", offset, C.float())


def mamba2_offset_term(offset: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """A Mamba-2 state offset's addition to the scan's output, (b, l, H, P) fp32: ``Σ_n h'[h, p, n] C_t[g(h), n]``
    with C (b, l, G, N) shared by the heads of each group."""
    heads, groups = offset.shape[0], C.shape[2]
    C = C.float().repeat_interleave(heads // groups, dim=2)  # (b, l, H, N)
    return torch.einsum("hpn,blhn->blhp", offset, C)


# -- the mixer forwards off the fused path ---------------------------------------------------------------------------


def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward of a mixer with a state adapter: a whole sequence from no state (training, evaluation, a prompt)
    or, with a cache that holds this layer's state, the next tokens from it (decoding), reading and updating the
    cache through its public methods as transformers' forward does.

    Left padding stays exact (pipeline/tasks/decoding.py): pad positions are zeroed before in_proj and after the
    conv, as transformers does, and take no step of the scan (Δ = 0), so that every sequence starts from h⁰ at its
    own first token; transformers lets pads decay the state, which changes nothing only from zero.
    """
    if len(args) > 1 or not MIXER_ARGUMENTS.issuperset(kwargs):
        raise TypeError(f"{type(self).__name__} with a state adapter: unexpected arguments {sorted(kwargs)}")
    hidden_states = args[0] if args else kwargs["hidden_states"]
    cache = mixer_cache(kwargs)
    previous = None if cache is None else recurrent_state(cache, self.layer_idx)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape[1] != hidden_states.shape[1]:
        mask = None  # a mask over the tokens before these: the new ones are no padding
    if mask is not None:
        hidden_states = (hidden_states * mask[:, :, None]).to(hidden_states.dtype)
    run = _mamba2_forward if is_mamba2(self) else _mamba1_forward
    return run(self, hidden_states, mask, cache, previous)


def _causal_conv(mixer: nn.Module, x: torch.Tensor, cache: Any) -> torch.Tensor:
    """SiLU of the depthwise causal conv over (b, c, l), after the inputs the cache holds (which it then keeps)."""
    length = x.shape[-1]
    if cache is not None:  # returns the cached inputs (or left zeros) followed by these
        x = cache.update_conv_state(x, mixer.layer_idx, conv_kernel_size=mixer.conv1d.kernel_size[0])
    return F.silu(mixer.conv1d(x)[..., : x.shape[-1]][..., -length:])


def _start(adapter: StateAdapter, previous: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor):
    """The state the scan starts from: the cached one, else h⁰ (initial-state tuning) or zero."""
    if previous is not None:
        return previous.float()
    start = like.new_zeros(shape)
    return start + adapter() if adapter.kind == "initial" else start


def _mamba1_forward(mixer: nn.Module, hidden_states, mask, cache, previous) -> torch.Tensor:
    dtype = hidden_states.dtype
    x, z = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, E, l) each
    u = _causal_conv(mixer, x, cache)
    if mask is not None:
        u = u * mask[:, None, :].to(u.dtype)
    rank, states = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = mixer.x_proj(u.transpose(1, 2)).split([rank, states, states], dim=-1)
    if hasattr(mixer, "dt_layernorm"):  # Jamba
        dt, B, C = mixer.dt_layernorm(dt), mixer.b_layernorm(B), mixer.c_layernorm(C)
    dt = F.softplus((mixer.dt_proj.weight @ dt.transpose(1, 2)).float() + mixer.dt_proj.bias.float()[:, None])
    A = -torch.exp(mixer.A_log.float())
    adapter = state_adapter(mixer)
    start = _start(adapter, previous, (x.shape[0], *A.shape), A)
    if mask is not None:  # a pad takes no step: the state passes it unchanged
        dt = dt * mask[:, None, :]
    y, last = _scan(u.float(), dt, A, B.float().transpose(1, 2), C.float().transpose(1, 2), start)
    if adapter.kind == "offset":
        y = y + mamba1_offset_term(adapter(), C.transpose(1, 2))
    y = (y + u.float() * mixer.D.float()[:, None]) * F.silu(z.float())
    if cache is not None:
        cache.update_recurrent_state(last.detach(), mixer.layer_idx)
    return mixer.out_proj(y.transpose(1, 2).to(dtype))


def _scan(u, dt, A, B, C, start) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1's selective scan, step by step in fp32: u, dt (b, E, l), A (E, N), B, C (b, N, l), from ``start``
    (b, E, N). Returns (y (b, E, l), the last state (b, E, N))."""
    state, ys = start, []
    for t in range(u.shape[-1]):
        state = torch.exp(dt[..., t, None] * A) * state + (dt[..., t] * u[..., t])[..., None] * B[:, None, :, t]
        ys.append((state * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1), state


def _mamba2_forward(mixer: nn.Module, hidden_states, mask, cache, previous) -> torch.Tensor:
    batch, length, _ = hidden_states.shape
    dtype = hidden_states.dtype
    heads, dim, groups, states = mixer.num_heads, mixer.intermediate_size, mixer.n_groups, mixer.ssm_state_size
    z, xbc, dt = mixer.in_proj(hidden_states).split([dim, mixer.conv_dim, heads], dim=-1)
    xbc = _causal_conv(mixer, xbc.transpose(1, 2), cache).transpose(1, 2)
    if mask is not None:
        xbc = xbc * mask[:, :, None].to(xbc.dtype)
    x, B, C = xbc.float().split([dim, groups * states, groups * states], dim=-1)
    x = x.reshape(batch, length, heads, mixer.head_dim)
    B, C = (t.reshape(batch, length, groups, states) for t in (B, C))
    dt = F.softplus(dt.float() + mixer.dt_bias.float()).clamp(*mixer.time_step_limit)
    if mask is not None:  # a pad takes no step: the state passes it unchanged
        dt = dt * mask[:, :, None]
    A = -torch.exp(mixer.A_log.float())
    adapter = state_adapter(mixer)
    state = _start(adapter, previous, (batch, heads, mixer.head_dim, states), A)
    per_head = heads // groups
    ys = []
    for t in range(length):
        b_t, c_t = (v[:, t].repeat_interleave(per_head, dim=1)[:, :, None, :] for v in (B, C))  # (b, H, 1, N)
        state = torch.exp(dt[:, t] * A)[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * b_t
        ys.append((state * c_t).sum(-1))
    y = torch.stack(ys, dim=1)  # (b, l, H, P)
    if adapter.kind == "offset":
        y = y + mamba2_offset_term(adapter(), C)
    y = (y + x * mixer.D.float()[:, None]).reshape(batch, length, dim)
    if cache is not None:
        cache.update_recurrent_state(state.detach(), mixer.layer_idx)
    return mixer.out_proj(mixer.norm(y, z).to(dtype))


__all__ = [
    "ATTRIBUTE",
    "KINDS",
    "StateAdapter",
    "attach",
    "forward",
    "mamba1_offset_term",
    "mamba2_offset_term",
    "refuse_merge",
    "restore_forward",
    "state_adapter",
    "state_shape",
    "unfused_forward",
]
