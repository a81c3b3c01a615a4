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

The hybrids (Bamba, Granite-4.0-H, Nemotron-H, Falcon-H1, Zamba2) are Mamba-2 families whose other layers are
declared as layer types (:class:`LayerType`): attention, MLP and MoE experts, with the linear module each LoRA target
name means there (docs/hybrids.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import LAYER_LORA_TARGETS, SDTConfig, trainable_count
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


@dataclass(frozen=True)
class LayerType:
    """A kind of layer a hybrid has beside its SSM mixers (attention, MLP, MoE experts): the classes of its modules,
    the :class:`SDTConfig` field that names its LoRA targets, and the linear module each target name means there
    (two names may mean one module where the model fuses them, as gate and up; ``modules`` empty: it takes no
    LoRA)."""

    name: str  # "attention", "mlp", "experts"
    field: str
    classes: tuple[str, ...]
    modules: tuple[tuple[str, str], ...]  # (target name, attribute of the layer's module)
    # the attributes are the module's own stacked (experts, out, in) tensors, not linear submodules
    stacked: bool = False

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The model's modules of this kind, each once: a module shared by several depths (Zamba2's shared
        transformer block) is one module with one set of weights."""
        return _modules_of(model, self.classes)

    def attributes(self, targets: tuple[str, ...]) -> tuple[str, ...]:
        """The linear modules (or stacked tensors) the target names mean, each once, in the layer's order."""
        mapping = dict(self.modules)
        return tuple(dict.fromkeys(mapping[t] for t in targets if t in mapping))

    def tensor(self, layer: nn.Module, attribute: str) -> tuple[nn.Module, str]:
        """(module, tensor name) of a target: the linear submodule's weight, or the layer's own stacked tensor."""
        return (layer, attribute) if self.stacked else (getattr(layer, attribute), "weight")


ATTENTION_MODULES = (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj"))
GATED_MLP_MODULES = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))


def attention(cls: str) -> LayerType:
    return LayerType("attention", "attention_lora_targets", (cls,), ATTENTION_MODULES)


def mlp(cls: str, modules: tuple[tuple[str, str], ...] = GATED_MLP_MODULES) -> LayerType:
    return LayerType("mlp", "mlp_lora_targets", (cls,), modules)


def experts(cls: str, modules: tuple[tuple[str, str], ...]) -> LayerType:
    """A MoE's routed experts, whose weights are one stacked (experts, out, in) tensor per projection: LoRA on them is
    one low-rank pair per expert. The router is never a target."""
    return LayerType("experts", "expert_lora_targets", (cls,), modules, stacked=True)


def _modules_of(model: nn.Module, classes: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    # Matched along the MRO: parametrize swaps a module's class for a generated subclass.
    return [(name, m) for name, m in model.named_modules() if any(c.__name__ in classes for c in type(m).__mro__)]


def _axis_text(count: Count, per: str = "") -> str:
    default = " (default)" if count.by_default else ""
    return f"{count.axis.name} {count.trained}/{count.axis.size}{per}{default}"


def _bc_blocks(targets: tuple[str, ...]) -> list[str]:
    return [t for t in ("B", "C") if t in targets]


class Mamba1Family:
    """MambaMixer / JambaMambaMixer."""

    lora_modules = ("in_proj", "x_proj", "dt_proj", "out_proj")
    # the LoRA baseline's modules (the lora preset): the official code's x_proj, dt_proj and out_proj
    lora_preset_modules = ("x_proj", "dt_proj", "out_proj")
    layer_types: tuple[LayerType, ...] = ()  # Jamba's attention and MLP layers are not covered (docs/hybrids.md)
    packed_attention = False  # Mamba-1's selective scan cannot keep packed examples apart in any case

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
    """Mamba2Mixer and the hybrids' Mamba-2 mixers, generalised as described in the module docstring."""

    lora_modules = ("in_proj", "out_proj")
    lora_preset_modules = ("in_proj", "out_proj")  # no x_proj or dt_proj: in_proj makes x, B, C and dt

    def __init__(
        self, mixer_class: str, layer_types: tuple[LayerType, ...] = (), *, packed_attention: bool = False
    ) -> None:
        """``packed_attention``: the model's attention keeps the examples of a packed row apart given position ids
        that restart at each example (its model hands them to transformers' mask, which then attends within an
        example only); a model with no attention has nothing to keep apart there."""
        self.mixer_class = mixer_class
        self.layer_types = layer_types
        self.packed_attention = packed_attention or not layer_types

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
    "mamba2": Mamba2Family("Mamba2Mixer"),
    # The hybrids (docs/hybrids.md): Mamba-2 mixers, and attention, MLP and MoE layers beside them.
    # packed_attention where the model gives its position ids to transformers' mask: Granite-4.0-H's does not
    "bamba": Mamba2Family("BambaMixer", (attention("BambaAttention"), mlp("BambaMLP")), packed_attention=True),
    "granitemoehybrid": Mamba2Family(
        "GraniteMoeHybridMambaLayer",
        (
            attention("GraniteMoeHybridAttention"),
            # the shared MLP's input_linear holds gate and up, chunked
            mlp("GraniteMoeHybridMLP", (("gate", "input_linear"), ("up", "input_linear"), ("down", "output_linear"))),
            experts(
                "GraniteMoeHybridExperts", (("gate", "gate_up_proj"), ("up", "gate_up_proj"), ("down", "down_proj"))
            ),
        ),
    ),
    "nemotron_h": Mamba2Family(
        "NemotronHMamba2Mixer",
        # its MLP (relu² of up) has no gate; a MoE layer's shared expert is one of these MLPs
        (
            attention("NemotronHAttention"),
            mlp("NemotronHMLP", GATED_MLP_MODULES[1:]),
            experts("NemotronHExperts", GATED_MLP_MODULES[1:]),
        ),
        packed_attention=True,
    ),
    "falcon_h1": Mamba2Family(
        "FalconH1Mixer", (attention("FalconH1Attention"), mlp("FalconH1MLP")), packed_attention=True
    ),
    "zamba2": Mamba2Family(
        "Zamba2MambaMixer",
        # one shared transformer block (attention + MLP) serves several depths: its LoRA is on the shared weights
        (
            attention("Zamba2Attention"),
            mlp("Zamba2MLP", (("gate", "gate_up_proj"), ("up", "gate_up_proj"), ("down", "down_proj"))),
        ),
        packed_attention=True,
    ),
}
# The Mamba-1 layout with RMSNorms on B, C and dt (FalconMamba): not supported, one line why.
REFUSED = {
    "falcon_mamba": "its mixer normalises B, C and dt with weightless RMSNorms that neither sdt's fused Mamba-1 path "
    "nor its tests cover yet; Mamba-1 (mamba), Jamba and the Mamba-2 hybrids are supported",
}


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in REFUSED:
        raise UnsupportedModelError("model_type", f"{model_type!r} is not supported: {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise UnsupportedModelError("model_type", f"{model_type!r} is not supported; sdt handles {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def for_model(model: nn.Module, config: SDTConfig) -> SDTConfig:
    """``config`` with what it leaves to the model's family filled in: ``lora_targets`` None (the lora preset's)
    becomes the family's LoRA-baseline modules where the method trains LoRA, nothing where it does not."""
    if config.lora_targets is not None:
        return config
    modules = family_of(model).lora_preset_modules if config.method_info.lora != "none" else ()
    return dataclasses.replace(config, lora_targets=modules)


def check_counts(model: nn.Module, config: SDTConfig) -> None:
    """Raise now what :func:`sdt.apply` and the selection after warmup would raise: a model sdt cannot tune
    (:class:`UnsupportedModelError`), a LoRA target the mixer lacks or a ratio that trains no channel, state or
    input of some layer (:class:`SDTConfigError`). Reads only shapes, so a skeleton on the meta device will do."""
    family = family_of(model)
    config = for_model(model, config)
    check_lora_targets(family, config)
    for prefix, mixer in mixers(model):
        family.check(prefix, mixer)
        if config.uses_sdt:
            family.counts(prefix, mixer, config)
    layer_lora_plan(model, config)


@dataclass(frozen=True)
class LayerLora:
    """LoRA on one kind of a hybrid's other layers: its layers in the model, and the linear modules of each that
    take LoRA (none: the kind stays frozen)."""

    kind: LayerType
    layers: list[tuple[str, nn.Module]]
    attributes: tuple[str, ...]

    def tensors(self, layer: nn.Module) -> list[tuple[nn.Module, str]]:
        """(module, tensor name) of each weight that takes LoRA in ``layer``."""
        return [self.kind.tensor(layer, attribute) for attribute in self.attributes]


def layer_lora_plan(model: nn.Module, config: SDTConfig) -> list[LayerLora]:
    """Per kind of layer beside the SSM mixers, what LoRA takes. A field set (not None) that touches no layer of its
    kind (no such layer, or only names its layers lack) is an :class:`SDTConfigError` naming it."""
    family = family_of(model)
    kinds = {kind.field: kind for kind in family.layer_types}
    for field in LAYER_LORA_TARGETS:
        if getattr(config, field) and field not in kinds:
            raise SDTConfigError(field, f"{type(model).__name__} has no such layers; sdt adapts only its SSM mixers")
    plan = []
    for kind in family.layer_types:
        targets, layers = config.layer_lora_targets(kind.field), kind.layers(model)
        explicit = getattr(config, kind.field) is not None
        if explicit and targets:
            _check_layer_targets(model, kind, layers, targets)
            if kind.stacked and config.lora_variant != "lora":
                raise SDTConfigError(
                    "lora_variant", f"{config.lora_variant!r} on MoE experts: their stacked weights take plain lora"
                )
        plan.append(LayerLora(kind, layers, kind.attributes(targets)))
    return plan


def _check_layer_targets(model: nn.Module, kind: LayerType, layers: list, targets: tuple[str, ...]) -> None:
    if not layers:
        model_name = type(model).__name__
        raise SDTConfigError(kind.field, f"{list(targets)} touch no layer: this {model_name} has no {kind.name} layer")
    # a name the family's layers lack (gate on Nemotron-H's MLP) is left out while another one touches the layers
    known = dict(kind.modules)
    if not any(t in known for t in targets):
        raise SDTConfigError(kind.field, f"{list(targets)} touch nothing: {kind.classes[0]} has {', '.join(known)}")


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
    found = _modules_of(model, (family.mixer_class,))
    if not found:
        raise UnsupportedModelError("model_type", f"no {family.mixer_class} found in this {type(model).__name__}")
    return found
