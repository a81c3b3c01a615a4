"""Writing adapter files: ``adapter_model.safetensors`` (tensors) + ``adapter_config.json`` (config). No pickle.

The safetensors file holds every adapter tensor under the model's own parameter names (LoRA factors, sparse
deltas and their index buffers) and the selection under ``sdt_selection.<mixer>.<key>``, so loading needs only
a fresh base model and this directory. :func:`save` writes to a temporary sibling directory that is renamed into
place: a crash leaves the old adapter or the new one, never half of one. :func:`save_into` (what
``model.save_pretrained`` of a tuned model does, hence Trainer's saves) writes the files into a directory that holds
other things, each file replaced atomically. Both add a ``config.json`` marker, so that a plain ``from_pretrained``
on an adapter stops with a message saying what to do; :func:`save_merged` writes a plain model instead.

``adapter_config.json`` records the sha256 of the tensor file, and the tensor file's header records the fields of
the config its tensors were made with (phase, model type, the SDT config with its ranks and alpha), so that
:mod:`sdt.io` can check each adapter on its own when it loads one.

Writing reads a :class:`sdt.Tuner`'s adapter and never builds one, so :mod:`sdt.model` builds on this module (a
tuned model's ``save_pretrained``) and :mod:`sdt.io`, which builds tuners from files, on both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from . import parametrize as P
from .state import refuse_merge

if TYPE_CHECKING:
    from .model import Tuner

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
SELECTION_PREFIX = "sdt_selection."
FORMAT_VERSION = 1
CHECKSUM_FIELD = "weights_sha256"  # in adapter_config.json: the sha256 of adapter_model.safetensors
# in the safetensors header: the JSON of the config fields that the tensors were made with
HEADER_KEY = "sdt_adapter"
# The marker's model type is the message that transformers' Auto classes stop with; without a config.json they stop
# with "Unrecognized model" (5.24), or with a KeyError where PEFT is installed.
MARKER_NAME = "config.json"
MARKER_MODEL_TYPE = (
    "sdt_adapter (an SDT/LoRA adapter, not a model: load it with sdt.load(base_model, this directory), "
    "or write a plain model with sdt.save_merged)"
)
DEFINING_FIELDS = ("phase", "model_type", "sdt")  # the fields of adapter_config.json that decide the tensors


def adapter_tensors(tuner: Tuner) -> dict[str, torch.Tensor]:
    """Every tensor that defines the adapter (the full method: every weight), keyed by its name in the model."""
    if tuner.merged:
        raise RuntimeError("adapter_tensors: the adapter was merged into the model already")
    if tuner.config.trains_all_weights:
        return {name: p.detach() for name, p in tuner.model.named_parameters()}
    prefixes = _adapter_prefixes(tuner.model)
    return {key: value.detach() for key, value in tuner.model.state_dict().items() if key.startswith(prefixes)}


def _adapter_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name, _ in P.adapters(model))


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
    """Write the adapter's two files into the existing ``directory``, each replaced atomically, other files left
    alone (:func:`save` replaces the whole directory). ``adapter_config.json`` gets the tensor file's checksum."""
    tensors = {k: v.contiguous().cpu() for k, v in adapter_tensors(tuner).items()}
    for prefix, selected in (tuner.selection or {}).items():
        tensors.update({f"{SELECTION_PREFIX}{prefix}.{key}": v.contiguous().cpu() for key, v in selected.items()})
    header = {
        "format": "pt",
        "sdtune_format": str(FORMAT_VERSION),
        HEADER_KEY: json.dumps({field: description[field] for field in DEFINING_FIELDS}, sort_keys=True),
    }
    weights = directory / WEIGHTS_NAME
    _replace_file(weights, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    config = {**description, CHECKSUM_FIELD: file_sha256(weights)}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _replace_file(directory / CONFIG_NAME, lambda tmp: tmp.write_text(text))


def _replace_file(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a sibling, then rename it over ``path``, with the mode a plain ``open`` would give it."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        write(staging)
        # safetensors writes 0600 files, which would hide an adapter from the other users of a shared directory
        os.chmod(staging, 0o666 & ~_umask())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # the umask can only be read by setting it; put back at once
    os.umask(mask)
    return mask


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save(tuner: Tuner, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write the adapter of ``tuner`` (any phase) to ``directory``, replacing it atomically."""
    description = describe(tuner, metadata)
    return write_atomically(directory, lambda tmp: write_adapter_directory(tmp, tuner, description))


def save_into(tuner: Tuner, directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write the adapter into ``directory`` (created if missing), next to whatever else is there: what
    ``model.save_pretrained`` does while adapters are attached (a Trainer checkpoint, ``save_model``)."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    write_adapter_directory(target, tuner, describe(tuner, metadata))
    return target


def write_adapter_directory(directory: Path, tuner: Tuner, description: dict[str, Any]) -> None:
    """The adapter's two files and the ``config.json`` marker that a plain ``from_pretrained`` stops at."""
    write_files(directory, tuner, description)
    marker = json.dumps({"model_type": MARKER_MODEL_TYPE}, indent=2) + "\n"
    _replace_file(directory / MARKER_NAME, lambda tmp: tmp.write_text(marker))


def merged_state_dict(tuner: Tuner) -> dict[str, torch.Tensor]:
    """The model's state dict as :meth:`Tuner.merge` would leave it (effective tensors under their plain names, no
    adapter tensors), computed without changing the model."""
    if tuner.phase != "train" or tuner.merged:
        raise RuntimeError(f"merged_state_dict: needs a training-phase adapter; the tuner is in {tuner.state_name}")
    refuse_merge(tuner.config.method, tuner.config.state)
    model = tuner.model
    adapter_prefixes = _adapter_prefixes(model)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith(adapter_prefixes)}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if parametrize.is_parametrized(module):
                prefix = f"{module_name}." if module_name else ""
                for name in module.parametrizations:
                    del state[f"{prefix}parametrizations.{name}.original"]
                    state[f"{prefix}{name}"] = getattr(module, name).detach()
    return state


def save_merged(tuner: Tuner, directory: str | os.PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Write a plain transformers model with the adapters baked in to ``directory`` (replacing it atomically):
    ``AutoModelForCausalLM.from_pretrained(directory)`` gives the adapted model's logits without sdt. Unlike
    :meth:`Tuner.merge`, the tuner keeps its adapters and can train on."""
    state = merged_state_dict(tuner)
    model = tuner.model
    # the class's own save_pretrained: the instance's writes the adapter (Tuner.save_pretrained)
    save = type(model).save_pretrained
    return write_atomically(directory, lambda tmp: save(model, tmp, state_dict=state, **save_pretrained_kwargs))


__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "adapter_tensors",
    "describe",
    "file_sha256",
    "merged_state_dict",
    "save",
    "save_into",
    "save_merged",
    "write_adapter_directory",
    "write_atomically",
    "write_files",
]
