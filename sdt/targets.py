"""Where each architecture keeps what SDT tunes. The one module that knows parameter names and layouts.

Mamba-1 (``MambaForCausalLM``) and Jamba (``JambaForCausalLM``, mamba layers only) share one layout (docs/method.md §1):
``A_log`` (E, N); ``x_proj.weight`` (R + 2N, E) with rows [dt | B | C]. A channel is an inner channel c; its B and
C parameters are column c of the B and C row blocks.

Mamba-2 (``Mamba2ForCausalLM``) is our generalisation, not the paper's (docs/method.md §6): ``A_log`` is one scalar per
head, so heads play channels; B and C are rows of ``in_proj.weight`` ([z | x | B | C | dt], B and C each
G·N rows over the D hidden inputs), so the B/C rows of a head's group play states, and each selected row trains
only its most-updated inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import SDTConfig, trainable_count
from .errors import SDTConfigError
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
    path share a single sparse-delta group.
    """

    path: str
    module: nn.Module
    tensor: str
    index: torch.Tensor


def _counts(config: SDTConfig, prefix: str, **axes: tuple[str, int]) -> dict[str, int]:
    """Trainable counts per axis; a count of zero is an error naming the config field."""
    counts = {}
    for axis, (field_name, size) in axes.items():
        k = trainable_count(getattr(config, field_name), size, field_name=field_name)
        if k == 0:
            raise SDTConfigError(
                field_name,
                f"{getattr(config, field_name)!r} freezes all {size} {axis} of {prefix}; "
                f"lower it or pass an int count of frozen {axis}",
            )
        counts[axis] = k
    return counts


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

    def warmup_specs(self, mixer: nn.Module) -> list[WarmupSpec]:
        return [WarmupSpec("A_log", mixer, "A_log")]

    def counts(self, prefix: str, mixer: nn.Module, config: SDTConfig) -> dict[str, int]:
        channels, states, _ = self._dims(mixer)
        return _counts(config, prefix, channels=("channels_frozen", channels), states=("states_frozen", states))

    def select(self, prefix: str, mixer: nn.Module, updates: WarmupUpdates, config: SDTConfig) -> Selection:
        counts = self.counts(prefix, mixer, config)
        return select_channels_and_states(
            updates["A_log"], counts["channels"], counts["states"], name=f"{prefix}.A_log"
        )

    def sparse_specs(self, mixer: nn.Module, selection: Selection, targets: tuple[str, ...]) -> list[SparseSpec]:
        channels, states, dt_rank = self._dims(mixer)
        picked, picked_states = selection["channels"], selection["states"]
        specs = []
        if "A_log" in targets:
            rows = picked.repeat_interleave(picked_states.shape[1])
            specs.append(SparseSpec("A_log", mixer, "A_log", rows * states + picked_states.reshape(-1)))
        # B and C share x_proj.weight: one adapter, one scatter, over the selected columns of both row blocks.
        blocks = [dt_rank + (0 if t == "B" else states) for t in ("B", "C") if t in targets]
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

    def _bc_rows(self, mixer: nn.Module) -> tuple[int, int]:
        d = self._dims(mixer)
        start = 2 * d["inner"]
        return start, start + 2 * d["groups"] * d["states"]

    def warmup_specs(self, mixer: nn.Module) -> list[WarmupSpec]:
        return [WarmupSpec("A_log", mixer, "A_log"), WarmupSpec("BC", mixer.in_proj, "weight", self._bc_rows(mixer))]

    def counts(self, prefix: str, mixer: nn.Module, config: SDTConfig) -> dict[str, int]:
        d = self._dims(mixer)
        return _counts(
            config,
            prefix,
            heads=("channels_frozen", d["heads"]),
            states=("states_frozen", d["states"]),
            inputs=("inputs_frozen", d["hidden"]),
        )

    def select(self, prefix: str, mixer: nn.Module, updates: WarmupUpdates, config: SDTConfig) -> Selection:
        d = self._dims(mixer)
        counts = self.counts(prefix, mixer, config)
        delta_b, delta_c = updates["BC"].reshape(2, d["groups"], d["states"], d["hidden"])
        return select_heads_and_rows(
            updates["A_log"],
            delta_b,
            delta_c,
            n_heads=counts["heads"],
            n_states=counts["states"],
            n_inputs=counts["inputs"],
            heads_per_group=d["heads"] // d["groups"],
            name=f"{prefix}.A_log",
        )

    def sparse_specs(self, mixer: nn.Module, selection: Selection, targets: tuple[str, ...]) -> list[SparseSpec]:
        d = self._dims(mixer)
        specs = []
        if "A_log" in targets:
            specs.append(SparseSpec("A_log", mixer, "A_log", selection["channels"]))
        b_start = self._bc_rows(mixer)[0]
        blocks = [b_start + (0 if t == "B" else d["groups"] * d["states"]) for t in ("B", "C") if t in targets]
        if blocks:
            groups, states, inputs = selection["groups"], selection["states"], selection["inputs"]
            rows_in_block = groups[:, None] * d["states"] + states  # (g, k_s)
            index = [((first + rows_in_block)[..., None] * d["hidden"] + inputs).reshape(-1) for first in blocks]
            specs.append(SparseSpec("in_proj.weight", mixer.in_proj, "weight", torch.cat(index)))
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
        raise ValueError(f"model: type {model_type!r} is not supported; sdt handles {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def check_counts(model: nn.Module, config: SDTConfig) -> None:
    """Raise the :class:`SDTConfigError` that the selection would raise after warmup (a ratio that trains no
    channel, state or input of some layer), now. Reads only shapes, so a skeleton on the meta device will do."""
    if config.uses_sdt:
        family = family_of(model)
        for prefix, mixer in mixers(model):
            family.counts(prefix, mixer, config)


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
        raise ValueError(f"model: no {family.mixer_class} found in this {type(model).__name__}")
    return found
