"""Where each architecture keeps what SDT tunes. The one module that knows parameter names and layouts.

Mamba-1 (``MambaForCausalLM``) and Jamba (``JambaForCausalLM``, mamba layers only) share one layout (docs/method.md §1):
``A_log`` (E, N); ``x_proj.weight`` (R + 2N, E) with rows [dt | B | C]. A channel is an inner channel c; its B and
C parameters are column c of the B and C row blocks.

Mamba-2 (``Mamba2ForCausalLM``) is our generalisation, not the paper's (docs/method.md §6): ``A_log`` is one scalar per
head, so heads play channels; B and C are rows of ``in_proj.weight`` ([z | x | B | C | dt], B and C each
G·N rows over the D hidden inputs), so the B/C rows of a head's group play states, and each selected row trains
only its most-updated inputs.

Each family lists the axes its selection ranks (:class:`Axis`): the config field that sets how many entries of
each stay frozen, and the default rule for a field left unset, which trains at least one (docs/mamba2.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import SDTConfig, trainable_count
from .errors import SDTConfigError, UnsupportedModelError
from .selection import select_channels_and_states, select_heads_and_rows

# (module, tensor name) -> dense warmup update of that tensor (or of its row block)
WarmupUpdates = dict[str, torch.Tensor]
Selection = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WarmupSpec:
    """A dense warmup delta: on ``module.<tensor>``, whole or on the rows ``[start, stop)``."""

    key: str
    module: nn.Module
    tensor: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class SparseSpec:
    """The entries of ``module.<tensor>`` that train, as flat row-major positions.

    ``path`` is the tensor's name relative to its mixer (e.g. ``x_proj.weight``); the layers' tensors of one
    path share a single sparse-delta group. ``rows``, where given, is a row range ``[start, stop)`` that holds every
    entry of ``index``: only those rows are adapted.
    """

    path: str
    module: nn.Module
    tensor: str
    index: torch.Tensor
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class DefaultCount:
    """How many entries of an axis train when its config field is left unset (None): ``count(size)``, never 0."""

    text: str  # the rule in words, for the error that a set count training nothing raises
    count: Callable[[int], int]


def paper_fraction(frozen: float) -> DefaultCount:
    """The paper's frozen fraction, rounded as the official code rounds it (docs/method.md §4), at least one trains."""
    return DefaultCount(f"{frozen:g} frozen, at least 1", lambda size: max(1, trainable_count(frozen, size)))


# Mamba-2's heads: 1 in 16, rounded up (1 of 8, 2 of 24, 4 of 64, 8 of 128); chosen by the experiment in
# docs/mamba2.md. The paper's 0.99 trains no head of a layer with up to 50 and one of one with 51 to 150.
HEADS_DEFAULT = DefaultCount("1 in 16, rounded up", lambda heads: math.ceil(heads / 16))


@dataclass(frozen=True)
class Axis:
    """One axis SDT selects along in a mixer: what it counts, its size, the config field that sets how many of it
    stay frozen, and how many train when that field is left unset."""

    name: str  # "channels", "heads", "states", "inputs"
    field: str  # the SDTConfig field
    size: int
    default: DefaultCount


@dataclass(frozen=True)
class Count:
    """How many entries of an axis train in one mixer, and whether the default rule gave the number."""

    axis: Axis
    trained: int
    by_default: bool


def resolve(config: SDTConfig, prefix: str, axis: Axis) -> Count:
    """The trainable count along ``axis`` of the mixer ``prefix``: the default rule when the field is unset, else
    the value as written (docs/method.md §4 rounding); a set value that trains nothing is an error naming the field
    and the layer."""
    value = getattr(config, axis.field)
    if value is None:
        return Count(axis, axis.default.count(axis.size), by_default=True)
    trained = trainable_count(value, axis.size, field_name=axis.field)
    if trained == 0:
        raise SDTConfigError(
            axis.field,
            f"{value!r} freezes all {axis.size} {axis.name} of {prefix}; lower it, pass an int count of frozen "
            f"{axis.name}, or leave it unset for the default ({axis.default.text})",
        )
    return Count(axis, trained, by_default=False)


def _axis_text(count: Count, per: str = "") -> str:
    default = " (default)" if count.by_default else ""
    return f"{count.axis.name} {count.trained}/{count.axis.size}{per}{default}"


def _bc_blocks(targets: tuple[str, ...]) -> list[str]:
    return [t for t in ("B", "C") if t in targets]


class Mamba1Family:
    """MambaMixer / JambaMambaMixer."""

    lora_modules = ("in_proj", "x_proj", "dt_proj", "out_proj")

    def __init__(self, mixer_class: str) -> None:
        self.mixer_class = mixer_class

    @staticmethod
    def _dims(mixer: nn.Module) -> tuple[int, int, int]:
        channels, states = mixer.A_log.shape
        dt_rank = mixer.x_proj.weight.shape[0] - 2 * states
        return channels, states, dt_rank

    def check(self, prefix: str, mixer: nn.Module) -> None:
        """Every layout transformers builds for this mixer is one sdt can tune."""

    def warmup_specs(self, mixer: nn.Module) -> list[WarmupSpec]:
        return [WarmupSpec("A_log", mixer, "A_log")]

    def axes(self, mixer: nn.Module) -> list[Axis]:
        channels, states, _ = self._dims(mixer)
        return [
            Axis("channels", "channels_frozen", channels, paper_fraction(0.99)),
            Axis("states", "states_frozen", states, paper_fraction(0.75)),
        ]

    def counts(self, prefix: str, mixer: nn.Module, config: SDTConfig) -> dict[str, Count]:
        return {axis.name: resolve(config, prefix, axis) for axis in self.axes(mixer)}

    def sdt_parameters(self, mixer: nn.Module, counts: dict[str, Count], targets: tuple[str, ...]) -> tuple[int, int]:
        """SDT's trainable entries in this mixer (fewest, most): k_c·k_s of A_log, N·k_c in each of B and C."""
        _, states, _ = self._dims(mixer)
        channels, kept_states = counts["channels"].trained, counts["states"].trained
        entries = ("A_log" in targets) * channels * kept_states + len(_bc_blocks(targets)) * states * channels
        return entries, entries

    def describe(self, mixer: nn.Module, counts: dict[str, Count], targets: tuple[str, ...]) -> list[str]:
        """What SDT trains in this mixer, axis by axis ("channels 15/1536 (default)", ...)."""
        _, states, _ = self._dims(mixer)
        parts = [_axis_text(counts["channels"])]
        if "A_log" in targets:
            parts.append(_axis_text(counts["states"], " per channel"))
        if blocks := _bc_blocks(targets):
            parts.append(f"{'/'.join(blocks)} columns of those channels (all {states} states)")
        return parts

    def select(self, prefix: str, mixer: nn.Module, updates: WarmupUpdates, config: SDTConfig) -> Selection:
        counts = self.counts(prefix, mixer, config)
        return select_channels_and_states(
            updates["A_log"], counts["channels"].trained, counts["states"].trained, name=f"{prefix}.A_log"
        )

    def sparse_specs(self, mixer: nn.Module, selection: Selection, targets: tuple[str, ...]) -> list[SparseSpec]:
        channels, states, dt_rank = self._dims(mixer)
        picked, picked_states = selection["channels"], selection["states"]
        specs = []
        if "A_log" in targets:
            rows = picked.repeat_interleave(picked_states.shape[1])
            specs.append(SparseSpec("A_log", mixer, "A_log", rows * states + picked_states.reshape(-1)))
        # B and C share x_proj.weight: one adapter, one scatter, over the selected columns of both row blocks.
        blocks = [dt_rank + (0 if t == "B" else states) for t in _bc_blocks(targets)]
        if blocks:
            state_rows = torch.arange(states, device=picked.device)
            index = [((first + state_rows)[:, None] * channels + picked[None, :]).reshape(-1) for first in blocks]
            specs.append(SparseSpec("x_proj.weight", mixer.x_proj, "weight", torch.cat(index)))
        return specs


class Mamba2Family:
    """Mamba2Mixer, generalised as described in the module docstring."""

    lora_modules = ("in_proj", "out_proj")
    mixer_class = "Mamba2Mixer"

    @staticmethod
    def _dims(mixer: nn.Module) -> dict[str, int]:
        return {
            "inner": mixer.intermediate_size,
            "groups": mixer.n_groups,
            "states": mixer.ssm_state_size,
            "heads": mixer.num_heads,
            "hidden": mixer.in_proj.weight.shape[1],
        }

    def check(self, prefix: str, mixer: nn.Module) -> None:
        """Heads split evenly into groups: each group's B/C rows serve ``heads // groups`` heads (transformers
        builds any n_groups, and fails only in the forward)."""
        d = self._dims(mixer)
        if d["groups"] < 1 or d["heads"] % d["groups"]:
            raise UnsupportedModelError(
                "n_groups", f"{d['groups']} does not divide num_heads {d['heads']} ({prefix}): each group's B/C rows "
                "must serve the same number of heads"
            )  # fmt: skip

    def _bc_rows(self, mixer: nn.Module) -> tuple[int, int]:
        d = self._dims(mixer)
        start = 2 * d["inner"]
        return start, start + 2 * d["groups"] * d["states"]

    def warmup_specs(self, mixer: nn.Module) -> list[WarmupSpec]:
        return [WarmupSpec("A_log", mixer, "A_log"), WarmupSpec("BC", mixer.in_proj, "weight", self._bc_rows(mixer))]

    def axes(self, mixer: nn.Module) -> list[Axis]:
        d = self._dims(mixer)
        return [
            Axis("heads", "channels_frozen", d["heads"], HEADS_DEFAULT),
            Axis("states", "states_frozen", d["states"], paper_fraction(0.75)),
            Axis("inputs", "inputs_frozen", d["hidden"], paper_fraction(0.99)),
        ]

    def counts(self, prefix: str, mixer: nn.Module, config: SDTConfig) -> dict[str, Count]:
        return {axis.name: resolve(config, prefix, axis) for axis in self.axes(mixer)}

    def _groups_range(self, mixer: nn.Module, heads: int) -> tuple[int, int]:
        """How many groups hold the ``heads`` selected heads: fewest (they share groups), most (one each)."""
        d = self._dims(mixer)
        return math.ceil(heads / (d["heads"] // d["groups"])), min(heads, d["groups"])

    def sdt_parameters(self, mixer: nn.Module, counts: dict[str, Count], targets: tuple[str, ...]) -> tuple[int, int]:
        """SDT's trainable entries in this mixer (fewest, most): k_h of A_log, and in each of B and C k_s rows of
        k_d inputs per group that holds a selected head, which the warmup decides."""
        heads = counts["heads"].trained
        per_group = len(_bc_blocks(targets)) * counts["states"].trained * counts["inputs"].trained
        a_log = ("A_log" in targets) * heads
        fewest, most = self._groups_range(mixer, heads)
        return a_log + fewest * per_group, a_log + most * per_group

    def describe(self, mixer: nn.Module, counts: dict[str, Count], targets: tuple[str, ...]) -> list[str]:
        """What SDT trains in this mixer, axis by axis ("heads 2/24 (default)", "B/C rows 64/256 (default)", ...)."""
        d = self._dims(mixer)
        parts = [_axis_text(counts["heads"])]
        if blocks := _bc_blocks(targets):
            states = counts["states"]
            fewest, most = self._groups_range(mixer, counts["heads"].trained)
            held = f"{fewest}" if fewest == most else f"each of {fewest}–{most}"
            spread = "" if d["groups"] == 1 else f" in {held} of {d['groups']} groups"
            default = " (default)" if states.by_default else ""
            rows = f"{len(blocks) * states.trained}/{len(blocks) * d['states']}"
            parts += [f"{'/'.join(blocks)} rows {rows}{spread}{default}", _axis_text(counts["inputs"], " per row")]
        return parts

    def select(self, prefix: str, mixer: nn.Module, updates: WarmupUpdates, config: SDTConfig) -> Selection:
        d = self._dims(mixer)
        counts = self.counts(prefix, mixer, config)
        delta_b, delta_c = updates["BC"].reshape(2, d["groups"], d["states"], d["hidden"])
        return select_heads_and_rows(
            updates["A_log"],
            delta_b,
            delta_c,
            n_heads=counts["heads"].trained,
            n_states=counts["states"].trained,
            n_inputs=counts["inputs"].trained,
            heads_per_group=d["heads"] // d["groups"],
            name=f"{prefix}.A_log",
        )

    def sparse_specs(self, mixer: nn.Module, selection: Selection, targets: tuple[str, ...]) -> list[SparseSpec]:
        d = self._dims(mixer)
        specs = []
        if "A_log" in targets:
            specs.append(SparseSpec("A_log", mixer, "A_log", selection["channels"]))
        b_start = self._bc_rows(mixer)[0]
        blocks = [b_start + (0 if t == "B" else d["groups"] * d["states"]) for t in _bc_blocks(targets)]
        if blocks:
            groups, states, inputs = selection["groups"], selection["states"], selection["inputs"]
            rows_in_block = groups[:, None] * d["states"] + states  # (g, k_s)
            index = [((first + rows_in_block)[..., None] * d["hidden"] + inputs).reshape(-1) for first in blocks]
            specs.append(SparseSpec("in_proj.weight", mixer.in_proj, "weight", torch.cat(index), self._bc_rows(mixer)))
        return specs


Family = Mamba1Family | Mamba2Family

FAMILIES: dict[str, Family] = {
    "mamba": Mamba1Family("MambaMixer"),
    "jamba": Mamba1Family("JambaMambaMixer"),
    "mamba2": Mamba2Family(),
}


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError("model_type", f"{model_type!r} is not supported; sdt handles {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def check_counts(model: nn.Module, config: SDTConfig) -> None:
    """Raise now what :func:`sdt.apply` and the selection after warmup would raise: a model sdt cannot tune
    (:class:`UnsupportedModelError`), a LoRA target the mixer lacks or a ratio that trains no channel, state or
    input of some layer (:class:`SDTConfigError`). Reads only shapes, so a skeleton on the meta device will do."""
    family = family_of(model)
    check_lora_targets(family, config)
    for prefix, mixer in mixers(model):
        family.check(prefix, mixer)
        if config.uses_sdt:
            family.counts(prefix, mixer, config)


def check_lora_targets(family: Family, config: SDTConfig) -> None:
    unsupported = [t for t in config.lora_targets if t not in family.lora_modules]
    if unsupported:
        raise SDTConfigError(
            "lora_targets",
            f"{unsupported} do not exist in {family.mixer_class}; choose among {', '.join(family.lora_modules)}",
        )


def mixers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's SSM mixers with their qualified names, in layer order (Jamba: mamba layers only)."""
    family = family_of(model)
    # Match along the MRO: parametrize swaps a module's class for a generated subclass.
    found = [
        (name, m)
        for name, m in model.named_modules()
        if any(cls.__name__ == family.mixer_class for cls in type(m).__mro__)
    ]
    if not found:
        raise UnsupportedModelError("model_type", f"no {family.mixer_class} found in this {type(model).__name__}")
    return found
