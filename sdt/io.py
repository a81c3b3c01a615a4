"""Adapter files: ``adapter_model.safetensors`` (tensors) + ``adapter_config.json`` (config). No pickle anywhere.

The safetensors file holds every adapter tensor under the model's own parameter names (LoRA factors, sparse
deltas and their index buffers) and the selection under ``sdt_selection.<mixer>.<key>``, so loading needs only
a fresh base model and this directory. :func:`save` writes to a temporary sibling directory that is renamed into
place: a crash leaves the old adapter or the new one, never half of one. :func:`save_into` (what
``model.save_pretrained`` of a tuned model does, hence Trainer's saves) writes the files into a directory that holds
other things, each file replaced atomically. Both add a ``config.json`` marker, so that a plain ``from_pretrained``
on an adapter stops with a message saying what to do; :func:`save_merged` writes a plain model instead.

Each adapter can be checked on its own: ``adapter_config.json`` records the sha256 of the tensor file, and the
tensor file's header records the fields of the config its tensors were made with (phase, model type, the SDT
config with its ranks and alpha). Loading checks both, then every tensor's name and shape against the adapter
that the config builds on the model, and refuses NaN or inf. Every failure is one :class:`AdapterFileError` that
names the file. (Adapters written before the checksum existed load with the checks that remain.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from . import parametrize as P
from .config import SDTConfig, SDTConfigError
from .model import Phase, Tuner
from .targets import Selection

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


# -- writing ----------------------------------------------------------------------------------------------------


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
    config = {**description, CHECKSUM_FIELD: _sha256(weights)}
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


def _sha256(path: Path) -> str:
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
    if recorded is not None and _sha256(weights_path) != recorded:
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
