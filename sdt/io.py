"""Reading adapter files (:mod:`sdt.saving` writes them) and attaching them to a model: :func:`load`, :func:`restore`.

Each adapter can be checked on its own: ``adapter_config.json`` records the sha256 of the tensor file, and the
tensor file's header records the fields of the config its tensors were made with (phase, model type, the SDT
config with its ranks and alpha). Loading checks both, then every tensor's name and shape against the adapter
that the config builds on the model, and refuses NaN or inf. Every failure is one :class:`AdapterFileError` that
names the file. (Adapters written before the checksum existed load with the checks that remain.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import SDTConfig
from .errors import SDTConfigError
from .model import Phase, Tuner
from .saving import (
    CHECKSUM_FIELD,
    CONFIG_NAME,
    DEFINING_FIELDS,
    FORMAT_VERSION,
    HEADER_KEY,
    SELECTION_PREFIX,
    WEIGHTS_NAME,
    adapter_tensors,
    file_sha256,
)
from .targets import Selection


class AdapterFileError(ValueError):
    """An adapter that cannot be loaded: missing, unreadable, corrupted, edited or not fitting the model.
    ``path`` is the file (or directory) at fault; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class StoredAdapter:
    """An adapter directory, read and checked as files (see :func:`read`)."""

    directory: Path
    config: SDTConfig
    phase: Phase
    model_type: str | None
    tensors: dict[str, torch.Tensor]  # the adapter's own, by name in the model
    selection: dict[str, Selection] | None  # for a training-phase SDT adapter


# -- reading ----------------------------------------------------------------------------------------------------


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``directory``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(directory, _no_adapter_here(Path(directory)))
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFileError(path, f"not valid JSON ({error})") from None


def _no_adapter_here(directory: Path) -> str:
    if not directory.is_dir():
        return "no such directory"
    checkpoints = sorted(p.name for p in directory.glob("checkpoint-*") if (p / CONFIG_NAME).is_file())
    hint = f"; it holds Trainer checkpoints ({', '.join(checkpoints)}), pass one of them" if checkpoints else ""
    return f"no adapter here ({CONFIG_NAME} missing){hint}"


def read(directory: str | os.PathLike) -> StoredAdapter:
    """Read and check an adapter directory on its own, before any model is touched: the config parses, the tensor
    file is readable, has the checksum the config recorded and was made with the config's defining fields, and
    holds only finite values. Raises :class:`AdapterFileError` naming the file at fault."""
    directory = Path(directory)
    description = read_config(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if description.get("format_version") != FORMAT_VERSION:
        version = description.get("format_version")
        raise AdapterFileError(config_path, f"adapter format {version!r} is not {FORMAT_VERSION}")
    missing = [field for field in DEFINING_FIELDS if field not in description]
    if missing:
        raise AdapterFileError(config_path, f"missing field(s) {', '.join(missing)}")
    if not weights_path.is_file():
        raise AdapterFileError(weights_path, "missing")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterFileError(weights_path, f"unreadable: truncated or not a safetensors file ({error})") from None
    recorded = description.get(CHECKSUM_FIELD)
    if recorded is not None and file_sha256(weights_path) != recorded:
        raise AdapterFileError(
            weights_path, f"its sha256 is not the one {CONFIG_NAME} recorded when saving: changed or replaced since"
        )
    if HEADER_KEY in header:
        saved_with = json.loads(header[HEADER_KEY])
        edited = _differences({field: description[field] for field in DEFINING_FIELDS}, saved_with)
        if edited:
            raise AdapterFileError(
                config_path, f"{'; '.join(edited)}: the tensors in {WEIGHTS_NAME} were saved otherwise (edited since?)"
            )
    not_finite = [key for key, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if not_finite:
        more = f" and {len(not_finite) - 3} more" if len(not_finite) > 3 else ""
        raise AdapterFileError(weights_path, f"NaN or inf in {', '.join(not_finite[:3])}{more}; refusing to load it")
    try:
        config = SDTConfig.from_dict(description["sdt"])
    except SDTConfigError as error:
        raise AdapterFileError(config_path, f"sdt.{error}") from None
    phase = description["phase"]
    if phase not in ("warmup", "train"):
        raise AdapterFileError(config_path, f"phase {phase!r} is neither 'warmup' nor 'train'")
    selection: dict[str, Selection] = {}
    for key in [k for k in tensors if k.startswith(SELECTION_PREFIX)]:
        prefix, name = key[len(SELECTION_PREFIX) :].rsplit(".", 1)
        selection.setdefault(prefix, {})[name] = tensors.pop(key)
    if phase == "train" and config.uses_sdt and not selection:
        raise AdapterFileError(weights_path, "a training-phase SDT adapter without its selection")
    return StoredAdapter(directory, config, phase, description["model_type"], tensors, selection or None)


def _differences(now: dict[str, Any], saved: dict[str, Any], prefix: str = "") -> list[str]:
    """``"<field> is <now>, saved as <saved>"`` for each (nested) field that differs."""
    found = []
    for key in sorted(set(now) | set(saved)):
        a, b = now.get(key), saved.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} is {a!r}, saved as {b!r}")
    return found


def load(model: nn.Module, directory: str | os.PathLike) -> Tuner:
    """Attach the adapter saved in ``directory`` (by :func:`save`, ``model.save_pretrained`` of a tuned model, a
    Trainer's ``save_model`` or checkpoint) to a fresh base ``model`` and load its tensors."""
    stored = read(directory)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if stored.model_type != model_type:
        raise AdapterFileError(
            stored.directory / CONFIG_NAME, f"adapter is for model type {stored.model_type!r}, not {model_type!r}"
        )
    try:
        tuner = Tuner(model, stored.config, selection=stored.selection if stored.phase == "train" else None)
    except (ValueError, IndexError, RuntimeError) as error:  # a selection that does not fit this model's shapes
        raise AdapterFileError(directory, f"does not fit this {type(model).__name__}: {error}") from error
    _load_tensors(tuner, stored)
    return tuner


def restore(tuner: Tuner, directory: str | os.PathLike) -> None:
    """Load the adapter saved in ``directory`` into ``tuner``'s own model object (resuming, where a trainer holds
    the model): a warmup-phase tuner first moves to a training-phase adapter's selection (``start_training``).
    The adapter must come from the same :class:`SDTConfig`."""
    stored = read(directory)
    if stored.config != tuner.config:
        changed = _differences(tuner.config.to_dict(), stored.config.to_dict())
        raise AdapterFileError(
            stored.directory / CONFIG_NAME, f"saved with another SDT config than this tuner's ({'; '.join(changed)})"
        )
    if stored.phase == "train" and tuner.phase == "warmup":
        tuner.start_training(stored.selection)
    elif stored.phase != tuner.state_name:
        raise AdapterFileError(directory, f"a {stored.phase} adapter cannot go into a tuner in {tuner.state_name}")
    elif stored.selection is not None and not _same_selection(stored.selection, tuner.selection):
        raise AdapterFileError(directory, "saved with another selection than the one this tuner trains")
    _load_tensors(tuner, stored)


def _same_selection(a: dict[str, Selection], b: dict[str, Selection] | None) -> bool:
    return (
        b is not None
        and a.keys() == b.keys()
        and all(a[p].keys() == b[p].keys() and all(torch.equal(a[p][k].cpu(), b[p][k].cpu()) for k in a[p]) for p in a)
    )


def _load_tensors(tuner: Tuner, stored: StoredAdapter) -> None:
    """Copy the stored tensors into the tuner's adapter, after checking names, shapes and index buffers."""
    targets = adapter_tensors(tuner)
    missing, unexpected = sorted(targets.keys() - stored.tensors.keys()), sorted(stored.tensors.keys() - targets.keys())
    where = stored.directory / WEIGHTS_NAME
    if missing or unexpected:
        raise AdapterFileError(
            where, f"does not fit the adapter in {CONFIG_NAME} (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    wrong_shape = [
        f"{key} {tuple(t.shape)} where the config makes {tuple(targets[key].shape)}"
        for key, t in stored.tensors.items()
        if t.shape != targets[key].shape
    ]
    if wrong_shape:
        raise AdapterFileError(where, f"tensor shapes do not fit {CONFIG_NAME}: {'; '.join(wrong_shape[:3])}")
    # Integer buffers are the sparse deltas' positions, which the tuner rebuilt from the stored selection.
    disagreeing = [
        key for key, t in stored.tensors.items() if not t.is_floating_point() and not torch.equal(t, targets[key].cpu())
    ]
    if disagreeing:
        raise AdapterFileError(where, f"{', '.join(disagreeing)} disagree with the stored selection")
    with torch.no_grad():
        for key, t in stored.tensors.items():
            if t.is_floating_point():
                targets[key].copy_(t)


__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "AdapterFileError",
    "StoredAdapter",
    "load",
    "read",
    "read_config",
    "restore",
]
