"""SDT configuration: one dataclass, the methods' presets from the registry, the fields a person sets
(:data:`SETTINGS`) and the count rounding (docs/method.md §4)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from .errors import SDTConfigError
from .methods import METHODS, Method, get_method
from .variants import VARIANTS, get_variant

SDT_TARGETS: tuple[str, ...] = ("A_log", "B", "C")
LORA_TARGETS: tuple[str, ...] = ("in_proj", "x_proj", "dt_proj", "out_proj")
# Fields that act only after the warmup, in the selection: trials differing only in them share one warmup.
SELECTION_FIELDS: tuple[str, ...] = ("channels_frozen", "states_frozen", "inputs_frozen")
# LoRA on a hybrid's layers beside its SSM mixers (docs/hybrids.md): per field, the target names it takes, and what
# it means when left unset (None) in a method that trains LoRA. MoE experts are off by default; routers never train.
LAYER_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attention_lora_targets": ("q", "k", "v", "o"),
    "mlp_lora_targets": ("gate", "up", "down"),
    "expert_lora_targets": ("gate", "up", "down"),
}
LAYER_LORA_DEFAULTS: dict[str, tuple[str, ...]] = {
    "attention_lora_targets": ("q", "k", "v", "o"),
    "mlp_lora_targets": ("gate", "up", "down"),
    "expert_lora_targets": (),
}


def _field(default: Any, *, short: str | None = None, settable: bool = True) -> Any:
    """A field with what :data:`SETTINGS` tells of it: its prefix in a short label, whether a person sets it."""
    return dataclasses.field(default=default, metadata={"short": short, "settable": settable})


@dataclass(frozen=True)
class SDTConfig:
    """What to tune, and how much of it.

    Counts (`channels_frozen`, `states_frozen`, `inputs_frozen`) follow the official code (docs/method.md §4): a float
    is the *frozen fraction* of the axis and is rounded with Python's ``round`` (banker's rounding on .5); an int
    is the absolute number of *frozen* entries. The trainable count is what remains, e.g. 0.99 of 1536 channels
    freezes 1521 and trains 15. A value set here is honoured exactly, and one that trains nothing in some layer is
    an error naming the field and the layer.

    Left unset (None), a count follows the model family's default rule, which trains at least one entry of every
    axis of every layer (:mod:`sdt.targets`): on Mamba-1 and Jamba the paper's 0.99 of the channels and 0.75 of the
    states frozen; on Mamba-2 1 in 16 heads (rounded up), 0.75 of the B/C rows and 0.99 of their inputs frozen.
    """

    method: str = "sdlora"  # a name from sdt.METHODS
    # LoRA, in weight space. alpha/rank is the scale; the default 8/8 = 1 is the official SDLoRA setting.
    lora_rank: int = _field(8, short="r")
    lora_alpha: float = 8.0
    # None: the model family's LoRA-baseline modules (the lora preset's; sdt.targets.for_model fills them in)
    lora_targets: tuple[str, ...] | None = _field(("out_proj",), short="")
    lora_variant: str = "lora"  # a name from sdt.VARIANTS: how the factors make a weight
    # LoRA on a hybrid model's attention, MLP and MoE-expert layers, by target name (LAYER_LORA_TARGETS); None: the
    # default (attention q, k, v, o; MLP gate, up, down; experts none) where the method trains LoRA.
    attention_lora_targets: tuple[str, ...] | None = _field(None, short="attn:")
    mlp_lora_targets: tuple[str, ...] | None = _field(None, short="mlp:")
    expert_lora_targets: tuple[str, ...] | None = _field(None, short="experts:")
    # SDT: A_log entries of the selected channels/states, and the B/C weights of the selected channels.
    sdt_targets: tuple[str, ...] = SDT_TARGETS
    # Frozen channels (Mamba-2: heads) and states per layer; None: the family's default rule (see above).
    channels_frozen: float | int | None = _field(None, short="ch")
    states_frozen: float | int | None = _field(None, short="st")
    # Mamba-2 only: how many of the hidden inputs of each selected B/C row of in_proj stay frozen (docs/method.md §6).
    inputs_frozen: float | int | None = None
    # Warmup length in optimizer steps (the official code's num_warmup_it + 1).
    warmup_steps: int = 500
    # Seeds the LoRA initialisation, so every data-parallel rank builds the same adapters. Not a setting: a
    # training run derives it from its own seed.
    seed: int = _field(0, settable=False)

    def __post_init__(self) -> None:
        method = get_method(self.method)
        get_variant(self.lora_variant)
        object.__setattr__(self, "sdt_targets", tuple(self.sdt_targets))
        for name in ("lora_targets", *LAYER_LORA_TARGETS):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        checked = (("lora_targets", LORA_TARGETS), ("sdt_targets", SDT_TARGETS), *LAYER_LORA_TARGETS.items())
        for name, allowed in checked:
            unknown = [t for t in getattr(self, name) or () if t not in allowed]
            if unknown:
                raise SDTConfigError(name, f"{unknown} not among {', '.join(allowed)}")
        if self.uses_lora and self.lora_rank < 1:
            raise SDTConfigError("lora_rank", f"must be >= 1, got {self.lora_rank}")
        if self.uses_lora and self.lora_alpha <= 0:
            raise SDTConfigError("lora_alpha", f"must be > 0 (alpha/rank scales the update), got {self.lora_alpha}")
        if self.uses_sdt and self.warmup_steps < 1:
            raise SDTConfigError("warmup_steps", f"SDT needs at least one warmup step, got {self.warmup_steps}")
        for name in SELECTION_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SDTConfigError(name, f"expected a float fraction or an int count, got {value!r}")
            if value < 0 or (isinstance(value, float) and value > 1):
                raise SDTConfigError(name, f"a fraction must lie in [0, 1] and a count be >= 0, got {value!r}")
        _check_method(method, self)

    @property
    def method_info(self) -> Method:
        return METHODS[self.method]

    @property
    def trains_all_weights(self) -> bool:
        return self.method_info.trains_all_weights

    @property
    def uses_sdt(self) -> bool:
        return bool(self.sdt_targets)

    @property
    def uses_lora(self) -> bool:
        """Whether LoRA trains anywhere: on the SSM mixers, or on a hybrid's other layers."""
        on_mixers = self.lora_targets is None or bool(self.lora_targets)  # None: the family's modules
        return on_mixers or any(self.layer_lora_targets(name) for name in LAYER_LORA_TARGETS)

    def layer_lora_targets(self, name: str) -> tuple[str, ...]:
        """The LoRA targets of one kind of a hybrid's other layers (a field of :data:`LAYER_LORA_TARGETS`): as set,
        or, left unset, the default where the method trains LoRA and nothing where it does not."""
        value = getattr(self, name)
        if value is not None:
            return value
        return LAYER_LORA_DEFAULTS[name] if self.method_info.lora != "none" else ()

    @property
    def state(self) -> str | None:
        """The state tensor the method trains in every mixer (``offset``, ``initial``: :mod:`sdt.state`), or None."""
        return self.method_info.state

    @property
    def mergeable(self) -> bool:
        """Whether the adapter can be baked into the model's weights: not a state tensor (docs/method.md §9)."""
        return self.state is None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SDTConfig:
        """The registered method ``name`` (``sdlora``, the paper's default, ``sdt``, ``lora``, ``full``, ...) with
        fields overridden."""
        return cls(**{**get_method(name).defaults, **overrides, "method": name})

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SDTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def overview(self) -> dict[str, dict[str, Any]]:
        """The config grouped for readers who do not parse it (an adapter's card): LoRA's size, SDT's frozen
        fractions or counts (None: the family's default rule), and where each kind of adapter goes."""
        return {
            "ranks": {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha},
            "ratios": {name: getattr(self, name) for name in SELECTION_FIELDS},
            "targets": {
                "lora": None if self.lora_targets is None else list(self.lora_targets),
                "sdt": list(self.sdt_targets),
                # as set; unset, the method's default for a hybrid's other layers (none on a pure SSM)
                **{
                    name.removesuffix("_lora_targets"): list(value)
                    for name in LAYER_LORA_TARGETS
                    if (value := getattr(self, name)) is not None
                },
            },
        }

    def warmup_inputs(self) -> dict[str, Any]:
        """The fields a warmup's result depends on: all but :data:`SELECTION_FIELDS`, which act after it."""
        return {k: v for k, v in self.to_dict().items() if k not in SELECTION_FIELDS}

    def describe(self, kept_per_layer: dict[str, int] | None = None) -> str:
        """One line: what the adapter trains (LoRA where and how big; SDT on which tensors, how many entries).
        ``kept_per_layer``: the selection's count per axis, when every layer keeps the same."""
        parts = [f"{self.method} ({self.method_info.summary})"]
        if self.state:
            parts.append(f"a trained state {self.state} per mixer")
        if self.uses_lora:
            variant = (
                "" if self.lora_variant == "lora" else f" ({self.lora_variant}: {VARIANTS[self.lora_variant].summary})"
            )
            places = ["the family's LoRA modules"] if self.lora_targets is None else []
            places += [", ".join(self.lora_targets)] if self.lora_targets else []
            places += [
                f"{name.removesuffix('_lora_targets')} {', '.join(value)}"
                for name in LAYER_LORA_TARGETS
                if (value := getattr(self, name))
            ]
            parts.append(f"LoRA{variant} rank {self.lora_rank}, alpha {self.lora_alpha:g} on {'; '.join(places)}")
        if self.uses_sdt:
            axes = set(kept_per_layer or ()) | {"channels", "states"}
            ratios = ", ".join(
                f"{name} {'default' if (value := getattr(self, name)) is None else value}"
                for name in SELECTION_FIELDS
                if name.removesuffix("_frozen") in axes
            )
            kept = (
                "; kept per layer: " + ", ".join(f"{a} {n}" for a, n in kept_per_layer.items())
                if kept_per_layer
                else ""
            )
            parts.append(f"SDT on {', '.join(self.sdt_targets)} ({ratios}{kept})")
        return "; ".join(parts)


@dataclass(frozen=True)
class Setting:
    """A field of :class:`SDTConfig` that a person sets to choose and shape a method: every field but ``seed``. A
    job spec's ``method`` section is made of them, so a new field appears there by being declared here."""

    name: str
    type: Any  # the field's annotation, resolved; ``float | int`` is a count (an int) or a fraction (a float)
    default: Any
    short: str | None  # its prefix in a short label ("r" of lora_rank: "r8"); None: written as name=value


def _settings() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(SDTConfig)
    return tuple(
        Setting(f.name, hints[f.name], f.default, f.metadata.get("short"))
        for f in dataclasses.fields(SDTConfig)
        if f.metadata.get("settable", True)
    )


SETTINGS: tuple[Setting, ...] = _settings()


def _check_method(method: Method, config: SDTConfig) -> None:
    """What the method needs and forbids, each error naming the field."""
    name = method.name
    if method.trains_all_weights and (config.lora_targets or config.sdt_targets):
        raise SDTConfigError("method", f"{name!r} trains every weight and takes no lora_targets or sdt_targets")
    set_layer_lora = [field for field in LAYER_LORA_TARGETS if getattr(config, field)]
    if method.lora == "none" and set_layer_lora:
        raise SDTConfigError(set_layer_lora[0], f"method {name!r} trains no LoRA")
    for field, need, used in (
        ("sdt_targets", method.sdt, config.uses_sdt),
        # set: a method that needs LoRA is told where, as a field left unset may touch nothing in a model
        ("lora_targets", method.lora, config.lora_targets is None or bool(config.lora_targets or set_layer_lora)),
    ):
        kind = "SDT" if field == "sdt_targets" else "LoRA"
        allowed = SDT_TARGETS if field == "sdt_targets" else LORA_TARGETS
        if need == "required" and not used:
            raise SDTConfigError(field, f"method {name!r} needs at least one of {', '.join(allowed)}")
        if need == "none" and used:
            alternatives = [m for m, info in METHODS.items() if info.lora != "none" and info.sdt != "none"]
            hint = f"; {' or '.join(repr(a) for a in alternatives)} trains both" if alternatives else ""
            raise SDTConfigError(field, f"method {name!r} trains no {kind}{hint}")


def trainable_count(frozen: float | int, size: int, *, field_name: str = "count") -> int:
    """How many of ``size`` entries train when ``frozen`` of them are frozen (docs/method.md §4 rounding); may be 0.
    The count a config gives an axis, defaults included, is :func:`sdt.targets.resolve`'s."""
    n_frozen = round(frozen * size) if isinstance(frozen, float) else int(frozen)
    if n_frozen > size:
        raise SDTConfigError(field_name, f"freezes {n_frozen} of only {size}")
    return size - n_frozen


__all__ = [
    "LAYER_LORA_DEFAULTS",
    "LAYER_LORA_TARGETS",
    "LORA_TARGETS",
    "SDT_TARGETS",
    "SELECTION_FIELDS",
    "SETTINGS",
    "SDTConfig",
    "Setting",
    "trainable_count",
]
