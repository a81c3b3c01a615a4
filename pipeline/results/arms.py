"""Arms: what a trial is compared as. Finished trials fall into *arms*, one per fine-tuning method (one per distinct
method mapping when the sweep searches ``method`` whole), and are named by readable labels ("lora r4
x_proj+dt_proj+out_proj") in the console, in MLflow and in the report. Light on purpose: the sweep driver's
callbacks use it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sdt
from pipeline.results.outcomes import TrialOutcome

METHOD_KEYS = ("method", "method.name")  # searched keys that pick the arm rather than a setting within it
# Method fields that sdt gives a short prefix, in label order ("lora r2 out_proj+x_proj").
LABEL_PREFIXES = {setting.name: setting.short for setting in sdt.SETTINGS if setting.short is not None}


@dataclass(frozen=True)
class Arm:
    key: str  # what identifies it: the method name, or the canonical JSON of a searched method mapping
    label: str
    method: str  # the method name


def canonical(value: Any) -> str:
    """One string per distinct value, also for the unhashable ones (lists, mappings)."""
    return json.dumps(value, sort_keys=True, default=str)


def value_label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "+".join(value_label(item) for item in value) if value else "[]"
    if isinstance(value, Mapping):
        return " ".join(f"{key}={value_label(item)}" for key, item in value.items())
    return str(value)


def method_label(name: str, method: Mapping[str, Any]) -> str:
    """``lora r2 out_proj+x_proj``: the name, then every other field that is set, the common ones briefly."""
    others = sorted(set(method) - set(LABEL_PREFIXES) - {"name"})
    parts = [name]
    for field in [field for field in LABEL_PREFIXES if field in method] + others:
        if method[field] is not None:
            parts.append(LABEL_PREFIXES.get(field, f"{field}=") + value_label(method[field]))
    return " ".join(parts)


def arm_for(config: Mapping[str, Any], method_name: str) -> Arm:
    """The arm of a trial that sampled ``config`` and runs the method ``method_name``: the method, or the whole
    method mapping it sampled when the sweep searches ``method``."""
    mapping = config.get("method")
    if isinstance(mapping, Mapping):
        return Arm(canonical(mapping), method_label(method_name, mapping), method_name)
    return Arm(method_name, method_name, method_name)


def arm_of(trial: TrialOutcome) -> Arm:
    return arm_for(trial.config, trial.spec.method.name)


def trial_label(config: Mapping[str, Any], method_name: str) -> str:
    """``sdlora ch0.8 st0.5 warmup_steps=20 · training.lr=0.01``: the arm, then the trial's other sampled values,
    whole mappings (a searched ``model``) last: where a console line cuts the label, it cuts those."""
    sampled = [(key, value) for key, value in config.items() if key not in METHOD_KEYS]
    sampled.sort(key=lambda item: isinstance(item[1], Mapping))
    values = ", ".join(f"{key}={value_label(value)}" for key, value in sampled)
    label = arm_for(config, method_name).label
    return f"{label} · {values}" if values else label
