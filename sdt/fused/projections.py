"""How each weight of a mixer enters the fused paths, read off its parametrizations at call time.

The big projections (in_proj, out_proj) get one of three treatments:

* ``frozen``: the plain weight, no gradient for it;
* ``activation``: a frozen base W0 with adapters that apply beside it in activation space: at most one
  :class:`~sdt.parametrize.LowRankDelta` (``W0 x + s · B (A x)``, so that the factors' gradients come from rank-r
  products) and at most one delta on a block of rows (Mamba-2's B/C rows: SDT's warmup
  :class:`~sdt.parametrize.DenseDelta` or its sparse training delta, added as ``Δ x`` to those rows' outputs). W0's
  gradient is never formed and no ``W0 + Δ`` is ever built;
* ``weight``: the weight as ``module.weight`` returns it (base + whatever adapters), with its full gradient, which
  autograd carries to the adapters. That is full fine-tuning, and the safe treatment of any parametrization this
  module does not know (a LoRA variant, a subclass, a chain): exactly what the weight-space path costs today.

The small tensors (x_proj, dt_proj, conv, A_log, D) are always read through their parametrizations: their
effective-weight gradients are cheap.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..parametrize import DenseDelta, LowRankDelta, SparseDeltaView

Kind = Literal["frozen", "activation", "weight"]


class RowDelta(NamedTuple):
    """A delta on the rows ``[start, stop)`` of a weight, dense fp32 (zero where nothing trains)."""

    start: int
    stop: int
    delta: torch.Tensor


class Projection(NamedTuple):
    weight: torch.Tensor  # the frozen base for "frozen" / "activation", the effective weight for "weight"
    bias: torch.Tensor | None
    lora: LowRankDelta | None
    rows: RowDelta | None


def _row_block(adapter: nn.Module) -> tuple[int, int] | None:
    # `type(...) is`, not isinstance: a subclass may change what the delta is, so it gets the safe treatment
    if type(adapter) is DenseDelta:
        return adapter.rows
    if type(adapter) is SparseDeltaView:
        return adapter.group.rows
    return None


def _activation_adapters(chain: nn.ModuleList) -> tuple[LowRankDelta | None, nn.Module | None] | None:
    """(the LoRA, the row delta) of a chain made of at most one of each, else None."""
    loras = [p for p in chain if type(p) is LowRankDelta]
    row_deltas = [p for p in chain if _row_block(p) is not None]
    if len(loras) > 1 or len(row_deltas) > 1 or len(loras) + len(row_deltas) != len(chain):
        return None
    return (loras or [None])[0], (row_deltas or [None])[0]


def kind_of(linear: nn.Linear) -> Kind:
    if not parametrize.is_parametrized(linear, "weight"):
        return "weight" if linear.weight.requires_grad else "frozen"
    chain = linear.parametrizations.weight
    if not chain.original.requires_grad and _activation_adapters(chain) is not None:
        return "activation"
    return "weight"


def _row_delta(adapter: nn.Module) -> RowDelta:
    start, stop = _row_block(adapter)
    if type(adapter) is DenseDelta:
        return RowDelta(start, stop, adapter.delta)
    return RowDelta(start, stop, adapter.group.dense_delta(adapter.position))


def projection(linear: nn.Linear) -> Projection:
    if kind_of(linear) == "activation":
        chain = linear.parametrizations.weight
        lora, row_delta = _activation_adapters(chain)
        return Projection(chain.original, linear.bias, lora, None if row_delta is None else _row_delta(row_delta))
    return Projection(linear.weight, linear.bias, None, None)


def describe(linear: nn.Linear) -> str:
    """For the log line: ``frozen``, ``lora r8``, ``lora r8 + rows 1536:1792``, ``weight-grad (full)`` or
    ``weight-grad (<adapter classes>)``."""
    kind = kind_of(linear)
    if kind == "activation":
        lora, row_delta = _activation_adapters(linear.parametrizations.weight)
        parts = [] if lora is None else [f"lora r{lora.lora_A.shape[0]}"]
        if row_delta is not None:
            start, stop = _row_block(row_delta)
            parts.append(f"rows {start}:{stop} ({type(row_delta).__name__})")
        return " + ".join(parts)
    if kind == "frozen":
        return "frozen"
    if not parametrize.is_parametrized(linear, "weight"):
        return "weight-grad (full)"
    return f"weight-grad ({', '.join(type(p).__name__ for p in linear.parametrizations.weight)})"


def describe_small(module: nn.Module, name: str) -> str:
    """``frozen``, ``trains`` (the tensor itself) or the adapter classes on it."""
    if parametrize.is_parametrized(module, name):
        return "+".join(type(p).__name__ for p in module.parametrizations[name])
    return "trains" if getattr(module, name).requires_grad else "frozen"


def project_channels_first(h: torch.Tensor, plan: Projection) -> torch.Tensor:
    """``plan``'s Linear applied to h (tokens, in), returned as (out, tokens): the layout the kernels want.

    Plain autograd ops: a weight that does not require grad gets no gradient, and the gradient of h comes back
    as a contiguous (tokens, in) matrix (autograd's mm backward keeps a transposed operand's layout).
    """
    h_t = h.t()
    out = torch.mm(plan.weight, h_t)
    if plan.lora is not None:
        lora = plan.lora
        low = torch.mm(lora.lora_A.to(h.dtype), h_t)
        out = torch.addmm(out, lora.lora_B.to(h.dtype), low, alpha=lora.scaling)
    if plan.rows is not None:
        start, stop, delta = plan.rows
        out[start:stop] += torch.mm(delta.to(h.dtype), h_t)
    if plan.bias is not None:
        out = out + plan.bias.to(out.dtype)[:, None]
    return out


def project_tokens_first(h: torch.Tensor, plan: Projection) -> torch.Tensor:
    """``plan``'s Linear applied to h (tokens, in), returned as (tokens, out): the layout of Mamba-2's kernels.

    Plain autograd ops, as :func:`project_channels_first`; a row delta adds ``h Δᵀ`` to its rows' outputs in place
    (no op before it keeps its output for backward).
    """
    out = torch.mm(h, plan.weight.t())
    if plan.lora is not None:
        lora = plan.lora
        low = torch.mm(h, lora.lora_A.to(h.dtype).t())
        out = torch.addmm(out, low, lora.lora_B.to(h.dtype).t(), alpha=lora.scaling)
    if plan.rows is not None:
        start, stop, delta = plan.rows
        out[:, start:stop] += torch.mm(h, delta.to(h.dtype).t())
    if plan.bias is not None:
        out = out + plan.bias.to(out.dtype)
    return out
