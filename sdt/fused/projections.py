"""How each weight of a Mamba-1 mixer enters the fused path, read off its parametrizations at call time.

The big projections (in_proj, out_proj) get one of three treatments:

* ``frozen``: the plain weight, no gradient for it;
* ``lora``: exactly one :class:`~sdt.parametrize.LowRankDelta` over a frozen base, computed in activation space
  (``W0 x + s · B (A x)``) so that the factors' gradients come from rank-r products and W0's never exists;
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

from ..parametrize import LowRankDelta

Kind = Literal["frozen", "lora", "weight"]


class Projection(NamedTuple):
    weight: torch.Tensor  # the frozen base for "frozen" / "lora", the effective weight for "weight"
    bias: torch.Tensor | None
    lora: LowRankDelta | None


def kind_of(linear: nn.Linear) -> Kind:
    if not parametrize.is_parametrized(linear, "weight"):
        return "weight" if linear.weight.requires_grad else "frozen"
    chain = linear.parametrizations.weight
    # `type(...) is`, not isinstance: a subclass may change what the delta is, so it gets the safe treatment
    if len(chain) == 1 and type(chain[0]) is LowRankDelta and not chain.original.requires_grad:
        return "lora"
    return "weight"


def projection(linear: nn.Linear) -> Projection:
    if kind_of(linear) == "lora":
        chain = linear.parametrizations.weight
        return Projection(chain.original, linear.bias, chain[0])
    return Projection(linear.weight, linear.bias, None)


def describe(linear: nn.Linear) -> str:
    """For the log line: ``frozen``, ``lora r8``, ``weight-grad (full)`` or ``weight-grad (<adapter classes>)``."""
    kind = kind_of(linear)
    if kind == "lora":
        return f"lora r{linear.parametrizations.weight[0].lora_A.shape[0]}"
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
    if plan.bias is not None:
        out = out + plan.bias.to(out.dtype)[:, None]
    return out
