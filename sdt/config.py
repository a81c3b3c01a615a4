"""SDT configuration: one dataclass, four presets, and the spec's count rounding."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Method = Literal["sdlora", "sdt", "lora", "full"]
METHODS: tuple[str, ...] = ("sdlora", "sdt", "lora", "full")
SDT_TARGETS: tuple[str, ...] = ("A_log", "B", "C")
LORA_TARGETS: tuple[str, ...] = ("in_proj", "x_proj", "dt_proj", "out_proj")


@dataclass(frozen=True)
class SDTConfig:
    """What to tune, and how much of it.

    Counts (`channels_frozen`, `states_frozen`, `inputs_frozen`) follow the official code (spec section 3): a float
    is the *frozen fraction* of the axis and is rounded with Python's ``round`` (banker's rounding on .5); an int
    is the absolute number of *frozen* entries. The trainable count is what remains, e.g. 0.99 of 1536 channels
    freezes 1521 and trains 15.
    """

    method: Method = "sdlora"
    # LoRA, in weight space. alpha/rank is the scale; the default 8/8 = 1 is the official SDLoRA setting.
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("out_proj",)
    # SDT: A_log entries of the selected channels/states, and the B/C weights of the selected channels.
    sdt_targets: tuple[str, ...] = SDT_TARGETS
    channels_frozen: float | int = 0.99
    states_frozen: float | int = 0.75
    # Mamba-2 only: how many of the hidden inputs of each selected B/C row of in_proj stay frozen (spec 9.3).
    inputs_frozen: float | int = 0.99
    # Warmup length in optimizer steps (the official code's num_warmup_it + 1).
    warmup_steps: int = 500
    # Seeds the LoRA initialisation, so every data-parallel rank builds the same adapters.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "sdt_targets", tuple(self.sdt_targets))
        for name, allowed in (("lora_targets", LORA_TARGETS), ("sdt_targets", SDT_TARGETS)):
            unknown = [t for t in getattr(self, name) if t not in allowed]
            if unknown:
                raise ValueError(f"{name}: {unknown} not among {', '.join(allowed)}")
        if self.lora_targets and self.lora_rank < 1:
            raise ValueError(f"lora_rank: must be >= 1, got {self.lora_rank}")
        if self.uses_sdt and self.warmup_steps < 1:
            raise ValueError(f"warmup_steps: SDT needs at least one warmup step, got {self.warmup_steps}")
        for name in ("channels_frozen", "states_frozen", "inputs_frozen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: expected a float fraction or an int count, got {value!r}")
            if value < 0 or (isinstance(value, float) and value > 1):
                raise ValueError(f"{name}: a fraction must lie in [0, 1] and a count be >= 0, got {value!r}")
        if self.method == "full" and (self.lora_targets or self.sdt_targets):
            raise ValueError("method: 'full' trains every weight and takes no lora_targets or sdt_targets")
        if self.method in ("sdlora", "sdt") and not self.sdt_targets:
            raise ValueError(f"sdt_targets: method {self.method!r} needs at least one of {', '.join(SDT_TARGETS)}")
        if self.method == "sdt" and self.lora_targets:
            raise ValueError("lora_targets: method 'sdt' has no LoRA; use 'sdlora'")
        if self.method == "lora" and (self.sdt_targets or not self.lora_targets):
            raise ValueError("lora_targets: method 'lora' needs LoRA targets and no sdt_targets")

    @property
    def uses_sdt(self) -> bool:
        return bool(self.sdt_targets)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SDTConfig:
        """One of ``sdlora`` (the paper's default), ``sdt``, ``lora`` or ``full``, with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"method: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SDTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


PRESETS: dict[str, SDTConfig] = {
    # Spec 0.1: SDT on A_log and the B/C parts of x_proj, LoRA r=8 alpha=8 on out_proj, 500 warmup steps.
    "sdlora": SDTConfig(),
    "sdt": SDTConfig(method="sdt", lora_targets=()),
    # The spec's matched-budget baselines (5.2) use ranks 2/3/5 on these modules; r=8 is the common default.
    "lora": SDTConfig(method="lora", lora_targets=("x_proj", "dt_proj", "out_proj"), sdt_targets=()),
    "full": SDTConfig(method="full", lora_targets=(), sdt_targets=()),
}


def trainable_count(frozen: float | int, size: int, *, field_name: str = "count") -> int:
    """How many of ``size`` entries train when ``frozen`` of them are frozen (spec section 3 rounding)."""
    n_frozen = int(round(frozen * size)) if isinstance(frozen, float) else int(frozen)
    if n_frozen > size:
        raise ValueError(f"{field_name}: freezes {n_frozen} of only {size}")
    return size - n_frozen


__all__ = ["SDTConfig", "PRESETS", "METHODS", "SDT_TARGETS", "LORA_TARGETS", "trainable_count", "Method"]
