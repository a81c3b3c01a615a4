"""LoRA on the Linear layers beside the Mamba mixers (a hybrid's attention and MLP) in activation space.

In weight space, :class:`~sdt.parametrize.LowRankDelta` makes ``module.weight`` return ``W0 + s·B·A``: every forward
builds that weight, and every backward forms its full gradient, which autograd then carries on to the factors; for
those layers that is as expensive as full fine-tuning. On the fused path a plain ``nn.Linear`` whose weight carries
exactly one LowRankDelta runs ``F.linear(x, W0, b) + s · F.linear(F.linear(x, A), B)`` instead, as PEFT runs LoRA:
W0 is read as stored (frozen, no gradient, no copy) and the factors' gradients come from rank-r products. What the
mixers' projections get inside the mixers (:mod:`.projections`), for the Linear layers outside them.

The numbers are the weight-space forward's up to rounding: the factors are cast to W0's dtype, as LowRankDelta casts
its product (LoRA dropout exists in neither). Only a training forward is taken over: evaluation runs the class's
forward, whose outputs are bitwise the merged model's. The chain is read at every call, so a module whose adapters
changed (warmup -> training, merge) runs the class's forward until it is exactly one LowRankDelta again. Anything
else (a LoRA variant, a subclass, a chain of several adapters, a subclass of ``nn.Linear``) keeps the weight-space
treatment, which is always right. The forward is an instance attribute, as the mixers' fused forwards are:
parametrize's class swaps keep it, ``copy.deepcopy`` rebinds it to the copy, and the state dict does not see it.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from ..compat.deepspeed import partitioned_by_zero3
from ..parametrize import LowRankDelta


def activation_lora(linear: nn.Module) -> LowRankDelta | None:
    """The LowRankDelta of a plain ``nn.Linear`` whose weight's chain is exactly that one adapter over a frozen base;
    None for anything else. ``type(...) is``, not isinstance: a subclass may change what the layer or the delta
    computes, so it gets the weight-space treatment."""
    if parametrize.type_before_parametrizations(linear) is not nn.Linear:
        return None
    if not parametrize.is_parametrized(linear, "weight"):
        return None
    chain = linear.parametrizations.weight
    if len(chain) != 1 or type(chain[0]) is not LowRankDelta or chain.original.requires_grad:
        return None
    return chain[0]


def lora_linear(x: torch.Tensor, base: torch.Tensor, bias: torch.Tensor | None, lora: LowRankDelta) -> torch.Tensor:
    """``x W0ᵀ + b + s · (x Aᵀ) Bᵀ``, the factors in W0's dtype (LowRankDelta adds ``s·B·A`` cast to it)."""
    out = F.linear(x, base, bias)
    low = F.linear(x, lora.lora_A.to(base.dtype))
    # one addmm adds the low-rank term into the output: no separate scale and add over the whole output
    out = torch.addmm(
        out.reshape(-1, out.shape[-1]),
        low.reshape(-1, low.shape[-1]),
        lora.lora_B.to(base.dtype).t(),
        alpha=lora.scaling,
    )
    return out.view(*x.shape[:-1], out.shape[-1])


def forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """Bound to a Linear instance by :func:`install`."""
    lora = activation_lora(self) if self.training else None
    if lora is None:
        return type(self).forward(self, input)
    return lora_linear(input, self.parametrizations.weight.original, self.bias, lora)


def _installed(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is forward


def _eligible(module: nn.Module) -> bool:
    if activation_lora(module) is None or any(partitioned_by_zero3(p) for p in module.parameters()):
        # ZeRO-3 gathers a weight only where a module reads it; this forward reads the base and the factors directly
        return False
    # another forward on the instance (accelerate's hooks wrap it there) stays: replacing it would drop its work
    return "forward" not in module.__dict__


def install(model: nn.Module, skip: list[nn.Module]) -> tuple[int, list[str]]:
    """Put the activation-space forward on every eligible Linear of ``model`` outside the modules ``skip`` (the
    mixers, whose projections their own path treats). Returns (how many took it, the adapter classes of each adapted
    Linear that keeps weight space, e.g. ``WeightDecomposedDelta``)."""
    uninstall(model)  # a Linear whose adapters changed since the last call is judged afresh
    inside = {id(sub) for module in skip for sub in module.modules()}
    taken, kept = 0, []
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.Linear):
            continue
        if _eligible(module):
            module.__dict__["forward"] = types.MethodType(forward, module)
            taken += 1
        elif parametrize.is_parametrized(module, "weight"):
            kept.append("+".join(type(p).__name__ for p in module.parametrizations.weight))
    return taken, kept


def uninstall(model: nn.Module) -> None:
    """Give every Linear that :func:`install` changed its class's forward back."""
    for module in model.modules():
        if _installed(module):
            del module.__dict__["forward"]
