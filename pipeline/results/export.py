"""The export stage: the best trial's adapter as a self-contained directory, optionally merged into a plain
Hugging Face model, and registered in the MLflow model registry as a real MLflow model under the alias ``champion``
(:mod:`pipeline.results.champion`; the card is :mod:`pipeline.results.model_card`).

The directory (``export.dir``, default ``<sweep dir>/export``) holds:

- ``adapter_model.safetensors`` + ``adapter_config.json``: the winning checkpoint's adapter, loaded onto its base
  model and saved again (an adapter that does not fit its base fails here, not in a user's hands), its config
  extended with the method, ranks, ratios, targets, how many entries SDT trains per layer (``selected``), the base
  model and the sdtune version;
- ``trial.json``: the trial id, its sampled hyperparameters, the last report's metrics, the checkpoint, the MLflow
  run ids and the registered model version;
- ``job.yaml``: the spec with the winning values applied; ``README.md``: a model card (base, scores, prompt format,
  how to load it);
- with merge, ``merged/``: the adapter baked into the base weights, with the tokenizer, for plain
  ``AutoModelForCausalLM.from_pretrained``.

Files get the usual modes (0666 less the umask; safetensors writes 0600). The registered model is MLflow's
transformers flavor of the merged model with its tokenizer (a ``text-generation`` pipeline), with the export
directory beside it as ``sdtune_export/``: ``mlflow.transformers.load_model("models:/<name>@champion")`` returns a
pipeline that generates. Everything, registration included, happens in a staging directory that then replaces the
export whole (:func:`pipeline.storage.paths.write_directory`: renamed into place locally, so a failure writing it
leaves the previous export as it was; uploaded with ``trial.json`` last in object storage, where a failure midway
leaves no export rather than a mix of two). A registration that fails (MLflow's registry unreachable) fails nothing:
the export is written without it, its ``trial.json`` and card say it is not registered, the champion stays the
version registered before, and a warning says why once the export is in place.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedTokenizerBase

import sdt
from pipeline import __version__
from pipeline.results.champion import register_staged_export
from pipeline.results.model_card import POSITION_KEYS, model_card, registry_name
from pipeline.results.outcomes import TrialOutcome, best_trial, exception_line, is_metric
from pipeline.results.tracking import CHAMPION_ALIAS, SweepTracker, is_finite_number
from pipeline.spec.job import JobSpec
from pipeline.storage.layout import ADAPTER_DIR, CARD_FILE, EXPORT_DIR, JOB_FILE, MERGED_DIR, TRIAL_FILE
from pipeline.storage.paths import (
    StoragePath,
    is_written_by_sdtune,
    local_copy,
    normal_file_modes,
    storage_path,
    write_directory,
    write_json,
)
from pipeline.trial.models import load_base_model

logger = logging.getLogger(__name__)


class ExportRefused(RuntimeError):
    """The export target is a directory that sdtune did not write, or another sweep's export: it is never
    replaced."""


def export_path(spec: JobSpec, out: str | StoragePath | None = None) -> StoragePath:
    """``out``, else ``export.dir``, else ``<sweep dir>/export`` (any of them may be in object storage)."""
    if out is not None:
        return storage_path(out)
    return storage_path(spec.export.dir) if spec.export.dir else spec.sweep_dir / EXPORT_DIR


def export_trials(
    spec: JobSpec,
    trials: list[TrialOutcome],
    tracker: SweepTracker,
    out: str | StoragePath | None = None,
    merge: bool | None = None,
    log: Callable[[str], Any] = print,
) -> StoragePath:
    """Write the export directory of the best of ``trials`` to ``out`` (default :func:`export_path`), with
    ``merged/`` when ``merge`` (default ``export.merge``), registered when ``export.register_model``.

    An export of the same trial from the same checkpoint is left as it is (and not registered again). Raises,
    writing nothing, :class:`pipeline.results.outcomes.NoUsableTrialError` when no trial finished with a finite metric
    and a checkpoint, and :class:`ExportRefused` when ``out`` is a directory that is not an sdtune export, or the
    export of another sweep. What follows the written export in MLflow (the registration, the winner on the sweep's
    run) does not fail it: a failure there is a warning, once the export is in place, and ``trial.json`` and the
    card say the export is not registered.
    """
    trial = best_trial(spec, trials)
    winner, out = trial.spec, export_path(spec, out)
    merge = spec.export.merge if merge is None else merge
    if out.exists():
        check_target(out, spec)
        if export_up_to_date(out, trial, merge):
            log(f"best trial {trial.trial_id}: {spec.search.metric} = {trial.score(spec.search.metric):.6g}; "
                f"its export is up to date: {out}")  # fmt: skip
            return out
    run_id = tracker.find_trial_run(trial.trial_id)
    record = trial_record(spec, trial, run_id, tracker.find_sweep())
    tuner, tokenizer = load_winner(trial)
    register, unregistered = spec.export.register_model and tuner.config.mergeable, []
    if spec.export.register_model and not register:  # the registry holds merged models
        logger.warning(
            "%s is written, but not registered in MLflow: method %r trains a state %s, which cannot be merged into "
            "weights",
            out,
            tuner.config.method,
            tuner.config.state,
        )

    def write(staging: Path) -> None:
        adapter_config = write_adapter(staging, tuner, winner)
        (staging / JOB_FILE).write_text(winner.to_yaml())
        write_json(staging / TRIAL_FILE, record)
        card = functools.partial(model_card, winner, record, adapter_config, out, merge)
        (staging / CARD_FILE).write_text(card(registry_name(spec) if register and run_id is not None else None))
        with tempfile.TemporaryDirectory() as scratch:
            merged = staging / MERGED_DIR if merge else Path(scratch) / MERGED_DIR
            if merge or register:
                save_merged(tuner, tokenizer, merged)  # last touch of the tuner: merging ends it
            normal_file_modes(staging)
            if register and (error := registration_failure(spec, tracker, staging, merged, record)) is not None:
                unregistered.append(error)
                (staging / CARD_FILE).write_text(card(None))

    write_directory(out, write, marker=TRIAL_FILE)
    for error in unregistered:
        logger.warning("%s is written, but not registered in MLflow: %s", out, exception_line(error), exc_info=error)
    record_winner(tracker, trial, record)
    registered = record["mlflow"]["registered_model"]
    log(f"best trial {trial.trial_id}: {spec.search.metric} = {record['value']:.6g} ({spec.search.mode})")
    if registered:
        log(f"registered as {registered['name']} version {registered['version']} (alias {CHAMPION_ALIAS})")
    log(f"exported to {out}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The files


def load_winner(trial: TrialOutcome) -> tuple[sdt.Tuner, PreTrainedTokenizerBase]:
    """The winning checkpoint's adapter on its base, in fp32 on the CPU whatever the trial trained in: merged
    weights must not lose digits to a bf16 round trip."""
    base_spec = trial.spec.model.model_copy(update={"dtype": "float32"})
    model, tokenizer = load_base_model(base_spec, "cpu", log=logger.info)
    with local_copy(trial.checkpoint / ADAPTER_DIR) as adapter:
        return sdt.load(model, adapter), tokenizer


def record_winner(tracker: SweepTracker, trial: TrialOutcome, record: Mapping[str, Any]) -> None:
    """The exported trial on the sweep's MLflow run; a failure there is a warning: the export is written."""
    try:
        tracker.record_winner(trial.spec, trial.trial_id, {k: v for k, v in record["metrics"].items() if is_metric(k)})
    except Exception as error:
        logger.warning("the sweep's MLflow run does not name its winner: %s", exception_line(error), exc_info=error)


def registration_failure(
    spec: JobSpec, tracker: SweepTracker, staging: Path, merged: Path, record: dict[str, Any]
) -> Exception | None:
    """:func:`register_staged_export`, whose failure (MLflow's registry unreachable, a model MLflow cannot log) is
    returned, not raised: the export is written without it."""
    try:
        register_staged_export(spec, tracker, staging, merged, record)
    except Exception as error:
        return error
    return None


def check_target(out: StoragePath, spec: JobSpec) -> None:
    """Raise :class:`ExportRefused` where the existing ``out`` may not be replaced by the export of ``spec``'s sweep:
    it is not an sdtune export (a file, a directory of someone's), or it is another sweep's."""
    if not is_written_by_sdtune(out, TRIAL_FILE):
        raise ExportRefused(f"{out} exists and is not an sdtune export: choose another --out / export.dir")
    if (owner := exported_sweep(out)) is not None and owner != str(spec.sweep_dir.resolve()):
        raise ExportRefused(
            f"{out} is the export of the sweep {owner}, not of {spec.sweep_dir.resolve()}: "
            "choose another --out / export.dir"
        )


def export_up_to_date(out: StoragePath, trial: TrialOutcome, merge: bool) -> bool:
    """Whether the existing export ``out`` is already this trial's, from the same checkpoint and as merged."""
    previous = out / TRIAL_FILE
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}  # none: an upload cut short
    same = (earlier.get("trial_id"), earlier.get("checkpoint")) == (trial.trial_id, str(trial.checkpoint))
    return same and (out / MERGED_DIR).is_dir() == merge


def exported_sweep(directory: StoragePath) -> str | None:
    """The sweep directory an sdtune export came from, as its ``job.yaml`` (the winner's spec) names it; None where it
    has none (an upload cut short)."""
    job_file = directory / JOB_FILE
    if not job_file.is_file():
        return None
    job = yaml.safe_load(job_file.read_text())
    return str((storage_path(job["output_dir"]) / job["name"]).resolve())


def write_adapter(directory: Path, tuner: sdt.Tuner, spec: JobSpec) -> dict[str, Any]:
    """``adapter_model.safetensors`` and ``adapter_config.json`` in ``directory``; returns the config."""
    description = sdt.saving.describe(tuner, adapter_metadata(tuner, spec))
    sdt.saving.write_files(directory, tuner, description)
    return description


def adapter_metadata(tuner: sdt.Tuner, spec: JobSpec) -> dict[str, Any]:
    """What ``adapter_config.json`` adds to :func:`sdt.save`'s description, for readers that do not parse ``sdt``.

    ``selected`` (which :func:`sdt.save` writes as the shapes of the index tensors, ``[13]`` and ``[13, 4]``, which
    read like indices) becomes per layer how many entries SDT trains along each axis, named for what they count:
    ``{"channels": 13, "states_per_channel": 4}`` (Mamba-2: ``channels`` are heads, then ``groups``,
    ``states_per_group``, ``inputs_per_state``); ``selected_indices`` says where the indices are.
    ``base_model`` (from :func:`sdt.save`) is what ``from_pretrained`` loads, the package's own folder for the
    builtin digits base; ``base_model_source`` is how the job named it.
    """
    config = tuner.config
    kept = {
        layer: {axis: int(indices.shape[-1]) for axis, indices in selection.items()}
        for layer, selection in (tuner.selection or {}).items()
    }
    counts = list(kept.values())
    return {
        "method": config.method,
        "description": config.describe(counts[0] if counts and all(c == counts[0] for c in counts) else None),
        **config.overview(),
        "selected": {layer: readable_counts(selection) for layer, selection in (tuner.selection or {}).items()},
        "selected_indices": "in adapter_model.safetensors, as sdt_selection.<layer>.<axis>",
        "base_model_source": spec.model.model_dump(mode="json", exclude_defaults=True),
        "sdtune_version": __version__,
    }


def readable_counts(selection: Mapping[str, Any]) -> dict[str, int]:
    """One layer's selection as counts named for what they count: an axis nested in another (its index tensor
    has one more dimension than the nearest earlier axis) counts per entry of that one."""
    counts: dict[str, int] = {}
    axes = list(selection.items())
    for position, (axis, indices) in enumerate(axes):
        parent = next((name for name, other in reversed(axes[:position]) if other.dim() == indices.dim() - 1), None)
        counts[f"{axis}_per_{parent.removesuffix('s')}" if parent else axis] = int(indices.shape[-1])
    return counts


def trial_record(spec: JobSpec, trial: TrialOutcome, run_id: str | None, parent_run_id: str | None) -> dict[str, Any]:
    """The content of ``trial.json``; ``mlflow.registered_model`` is filled in by registration."""
    return {
        "trial_id": trial.trial_id,
        "status": trial.status,
        "metric": spec.search.metric,
        "mode": spec.search.mode,
        "value": trial.score(spec.search.metric),
        "hyperparameters": dict(trial.config),
        "metrics": report_metrics(trial.metrics),
        "checkpoint": str(trial.checkpoint),
        "mlflow": {"run_id": run_id, "parent_run_id": parent_run_id, "registered_model": None},
    }


def report_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer's finite numbers of a report (JSON has no NaN), without Ray's bookkeeping (pid, timestamps)."""
    return {
        key: value
        for key, value in report.items()
        if (is_metric(key) or key in POSITION_KEYS) and is_finite_number(value)
    }


def save_merged(tuner: sdt.Tuner, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """The adapter baked into the base weights, saved with the tokenizer as a plain transformers directory."""
    model = tuner.merge()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


__all__ = [
    "check_target",
    "export_path",
    "export_trials",
]
