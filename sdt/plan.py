"""What a config will train in a model, from the model's shapes alone (a skeleton on the meta device will do).

Per kind of mixer: each SDT axis with how many of its entries train and whether the family's default rule set
the number (:mod:`sdt.targets`), the LoRA adapters, and the trainable parameters; on a hybrid, the same for its
attention, MLP and MoE layers and one line of what is touched per layer type; then the model's total. Which
groups of a Mamba-2 layer hold the selected heads is known only after the warmup, so with several groups the
count is a range. ``sdtune validate`` prints it; ``tuner.num_trainable_parameters()`` after the selection lies in
the range.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .config import SDTConfig
from .state import state_shape
from .targets import Family, LayerLora, check_counts, family_of, for_model, layer_lora_plan, mixers
from .variants import get_variant


@dataclass(frozen=True)
class LayerPlan:
    """What trains in one mixer: ``parts`` in words, ``parameters`` its trainable count (fewest, most)."""

    mixer: str
    parts: tuple[str, ...]
    parameters: tuple[int, int]


@dataclass(frozen=True)
class Plan:
    """What ``method`` trains: each kind of mixer with how many mixers are of it, and the whole model's count."""

    method: str
    layers: tuple[tuple[LayerPlan, int], ...]
    trainable: tuple[int, int]  # fewest, most
    total: int  # every parameter of the model
    # a hybrid's layer types, touched of all ("mamba 36/36 (SDT+LoRA)", "experts 0/40"); empty for a pure SSM
    coverage: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """One line per kind of mixer, then the total ("trainable: 455,280 of 129,135,360 parameters (0.35%)")."""
        if not self.layers:
            return [f"every weight trains: {self.total:,} parameters"]
        lines = [
            f"{count} × {layer.mixer}: {'; '.join(layer.parts)}: {_span(layer.parameters)} trainable parameters each"
            for layer, count in self.layers
        ]
        share = "–".join(f"{100 * n / self.total:.3g}%" for n in sorted(set(self.trainable)))
        coverage = [f"layers: {', '.join(self.coverage)}"] if self.coverage else []
        return [*lines, *coverage, f"trainable: {_span(self.trainable)} of {self.total:,} parameters ({share})"]


def _span(numbers: tuple[int, int]) -> str:
    low, high = numbers
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def plan(model: nn.Module, config: SDTConfig) -> Plan:
    """What ``config`` trains in ``model``; raises what :func:`sdt.apply` would (:func:`sdt.check_counts`)."""
    check_counts(model, config)
    config = for_model(model, config)
    total = sum(p.numel() for p in model.parameters())
    if config.trains_all_weights:
        return Plan(config.method, (), (total, total), total)
    family = family_of(model)
    kinds: dict[LayerPlan, int] = {}
    found = mixers(model)
    for prefix, mixer in found:
        layer = _layer_plan(family, prefix, mixer, config)
        if layer.parts:  # a hybrid's mixers may train nothing (LoRA on attention and MLP only)
            kinds[layer] = kinds.get(layer, 0) + 1
    layer_lora = layer_lora_plan(model, config)
    for kind in layer_lora:
        for module, _ in _distinct(kind) if kind.attributes else ():
            layer = _lora_layer_plan(kind, module, config)
            kinds[layer] = kinds.get(layer, 0) + 1
    trainable = tuple(sum(layer.parameters[end] * count for layer, count in kinds.items()) for end in (0, 1))
    coverage = _coverage(config, len(found), layer_lora) if family.layer_types else ()
    return Plan(config.method, tuple(kinds.items()), trainable, total, coverage)


def _distinct(kind: LayerLora) -> list[tuple[nn.Module, int]]:
    """The kind's layers with distinct weights, each with how many depths use it: Zamba2's shared transformer block
    is one module per depth, all of them on the same (tied) weights, which train as one."""
    depths = Counter(id(next(m.parameters())) for _, m in kind.layers)
    first: dict[int, nn.Module] = {}
    for _, module in kind.layers:
        first.setdefault(id(next(module.parameters())), module)
    return [(module, depths[key]) for key, module in first.items()]


def _coverage(config: SDTConfig, n_mixers: int, layer_lora: list[LayerLora]) -> tuple[str, ...]:
    """Per layer type, how many of its layers train and how: "mamba 36/36 (SDT+LoRA)", "attention 1/1 (LoRA,
    shared by 2 depths)", "experts 0/40"."""
    how = "+".join(name for name, used in (("SDT", config.uses_sdt), ("LoRA", bool(config.lora_targets))) if used)
    parts = [f"mamba {n_mixers if how else 0}/{n_mixers}" + (f" ({how})" if how and n_mixers else "")]
    for kind in layer_lora:
        distinct = _distinct(kind)
        n = len(distinct)
        touched = n if kind.attributes else 0
        notes = ["LoRA"] if touched else []
        if n and (shared := max(depths for _, depths in distinct)) > 1:
            notes.append(f"shared by {shared} depths")
        parts.append(f"{kind.kind.name} {touched}/{n}" + (f" ({', '.join(notes)})" if notes else ""))
    return tuple(parts)


def _lora_layer_plan(kind: LayerLora, module: nn.Module, config: SDTConfig) -> LayerPlan:
    lora = sum(_lora_parameters(getattr(owner, name).shape, config) for owner, name in kind.tensors(module))
    name = next(cls.__name__ for cls in type(module).__mro__ if not cls.__name__.startswith("Parametrized"))
    return LayerPlan(name, (f"{_lora_text(config)} on {', '.join(kind.attributes)}",), (lora, lora))


def _lora_text(config: SDTConfig) -> str:
    variant = "" if config.lora_variant == "lora" else f" ({config.lora_variant})"
    return f"LoRA{variant} r{config.lora_rank}"


def _layer_plan(family: Family, prefix: str, mixer: nn.Module, config: SDTConfig) -> LayerPlan:
    parts: list[str] = []
    sdt_parameters = (0, 0)
    if config.uses_sdt:
        counts = family.counts(prefix, mixer, config)
        parts += family.describe(mixer, counts, config.sdt_targets)
        sdt_parameters = family.sdt_parameters(mixer, counts, config.sdt_targets)
    lora = 0  # and the state tensor: what every mixer of the kind trains besides SDT's deltas
    if config.lora_targets:
        parts.append(f"{_lora_text(config)} on {', '.join(config.lora_targets)}")
        lora = sum(_lora_parameters(getattr(mixer, target).weight.shape, config) for target in config.lora_targets)
    if config.state:
        shape = state_shape(mixer)
        parts.append(f"state {config.state} {' × '.join(map(str, shape))}")
        lora += math.prod(shape)
    name = next(cls.__name__ for cls in type(mixer).__mro__ if cls.__name__ == family.mixer_class)
    return LayerPlan(name, tuple(parts), (sdt_parameters[0] + lora, sdt_parameters[1] + lora))


def _lora_parameters(shape: torch.Size, config: SDTConfig) -> int:
    """The parameters of the LoRA variant's adapter on a weight of ``shape``, counted on one built on the meta
    device (a variant may add its own, as DoRA's magnitudes)."""
    variant = get_variant(config.lora_variant)
    adapter = variant.build(torch.empty(shape, device="meta"), config.lora_rank, config.lora_alpha, torch.Generator())
    return sum(p.numel() for p in adapter.parameters())


__all__ = ["LayerPlan", "Plan", "plan"]
