"""Adapter files: ``adapter_model.safetensors`` (tensors) + ``adapter_config.json`` (config). No pickle anywhere.

The safetensors file holds every adapter tensor under the model's own parameter names (LoRA factors, sparse
deltas and their index buffers) and the selection under ``sdt_selection.<mixer>.<key>``, so loading needs only
a fresh base model and this directory. Writes go to a temporary sibling directory that is renamed into place:
a crash leaves the old adapter or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import parametrize as P
from .config import SDTConfig
from .model import Tuner
from .targets import Selection

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
SELECTION_PREFIX = "sdt_selection."
FORMAT_VERSION = 1


def adapter_tensors(tuner: Tuner) -> dict[str, torch.Tensor]:
    """Every tensor that defines the adapter (the full method: every weight), keyed by its name in the model."""
    if tuner.merged:
        raise RuntimeError("adapter_tensors: the adapter was merged into the model already")
    if tuner.config.trains_all_weights:
        return {name: p.detach() for name, p in tuner.model.named_parameters()}
    adapter_names = {f"{name}." for name, _ in P.adapters(tuner.model)}
    return {
        key: value.detach()
        for key, value in tuner.model.state_dict().items()
        if any(key.startswith(prefix) for prefix in adapter_names)
    }


def write_atomically(directory: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_dir)`` and then move ``tmp_dir`` to ``directory``, replacing what was there."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would outlive the rename and hide the result from other users.
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        write(staging)
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def describe(tuner: Tuner, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``adapter_config.json`` for ``tuner``, with ``metadata`` added."""
    model_config = getattr(tuner.model, "config", None)
    return {
        "format_version": FORMAT_VERSION,
        "phase": tuner.phase,
        "model_type": getattr(model_config, "model_type", None),
        "base_model": getattr(model_config, "name_or_path", None) or None,
        "sdt": tuner.config.to_dict(),
        "num_trainable_parameters": tuner.num_trainable_parameters(),
        "selected": {prefix: {k: list(v.shape) for k, v in s.items()} for prefix, s in (tuner.selection or {}).items()},
        **(metadata or {}),
    }


def write_files(directory: Path, tuner: Tuner, description: dict[str, Any]) -> None:
    """Write the adapter's two files into the existing ``directory`` (in place: :func:`save` is the atomic one)."""
    tensors = {k: v.contiguous().cpu() for k, v in adapter_tensors(tuner).items()}
    for prefix, selected in (tuner.selection or {}).items():
        tensors.update({f"{SELECTION_PREFIX}{prefix}.{key}": v.contiguous().cpu() for key, v in selected.items()})
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "sdtune_format": str(FORMAT_VERSION)})
    (directory / CONFIG_NAME).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def save(tuner: Tuner, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write the adapter of ``tuner`` (any phase) to ``directory``, replacing it atomically."""
    description = describe(tuner, metadata)
    return write_atomically(directory, lambda tmp: write_files(tmp, tuner, description))


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / CONFIG_NAME).read_text())


def load(model: nn.Module, directory: str | os.PathLike) -> Tuner:
    """Attach the adapter saved in ``directory`` to a fresh base ``model`` and load its tensors."""
    description = read_config(directory)
    if description.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: adapter format {description.get('format_version')!r} is not {FORMAT_VERSION}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if description["model_type"] != model_type:
        raise ValueError(f"{directory}: adapter is for model type {description['model_type']!r}, not {model_type!r}")
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    selection: dict[str, Selection] = {}
    for key in [k for k in tensors if k.startswith(SELECTION_PREFIX)]:
        prefix, name = key[len(SELECTION_PREFIX) :].rsplit(".", 1)
        selection.setdefault(prefix, {})[name] = tensors.pop(key)
    config = SDTConfig.from_dict(description["sdt"])
    if description["phase"] == "warmup":
        tuner = Tuner(model, config)
    else:
        tuner = Tuner(model, config, selection=selection or None)
    expected = set(adapter_tensors(tuner))
    if expected != set(tensors):
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{directory}: adapter does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    device = next(model.parameters()).device
    state = {k: v.to(device) for k, v in tensors.items()}
    if config.trains_all_weights:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state[name])
    else:
        model.load_state_dict(state, strict=False)
    return tuner
