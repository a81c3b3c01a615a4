"""The export stage: the best trial's adapter as a self-contained directory, optionally merged into a plain
Hugging Face model, and registered in the MLflow model registry under the alias ``champion``.

The directory (``export.dir``, default ``<sweep dir>/export``) holds:

- ``adapter_model.safetensors`` + ``adapter_config.json``: the winning checkpoint's adapter, loaded onto its base
  model and saved again (an adapter that does not fit its base fails here, not in a user's hands), its config
  extended with the method, ranks, ratios, targets, the selected counts per layer, the base model and the
  sdtune version;
- ``trial.json``: the trial id, its sampled hyperparameters, the last report's metrics, the checkpoint, the MLflow
  run ids and the registered model version;
- ``job.yaml``: the spec with the winning values applied; ``README.md``: a short model card;
- with merge, ``merged/``: the adapter baked into the base weights, with the tokenizer, for plain
  ``AutoModelForCausalLM.from_pretrained``.

Everything, registration included, happens in a staging directory that then replaces the export whole
(:func:`pipeline.storage.write_directory`: renamed into place locally, so a failure anywhere leaves the previous
export, and the champion it registered, as they were; uploaded with ``trial.json`` last in object storage, where a
failure midway leaves no export rather than a mix of two).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from transformers import PreTrainedTokenizerBase

import sdt
from pipeline import __version__
from pipeline.config import JobSpec
from pipeline.models import load_base_model
from pipeline.results import ADAPTER_DIR, JOB_FILE, TrialOutcome, best_trial, is_metric
from pipeline.storage import StoragePath, is_written_by_sdtune, local_copy, storage_path, write_directory
from pipeline.tracking import SweepTracker, is_finite_number

logger = logging.getLogger(__name__)

EXPORT_DIR = "export"
MERGED_DIR = "merged"
TRIAL_FILE = "trial.json"
CARD_FILE = "README.md"
ARTIFACT_PATH = "export"  # where the export lands among the trial run's MLflow artifacts
CHAMPION_ALIAS = "champion"
POSITION_KEYS = ("step", "epoch")  # where in training the last report was made


class ExportRefused(RuntimeError):
    """The export target is a directory that sdtune did not write: it is never replaced."""


def export_path(spec: JobSpec) -> StoragePath:
    """``export.dir``, else ``<sweep dir>/export`` (either may be in object storage)."""
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
    writing nothing, :class:`pipeline.results.NoUsableTrialError` when no trial finished with a finite metric and
    a checkpoint, and :class:`ExportRefused` when ``out`` is a directory that is not an sdtune export.
    """
    trial = best_trial(spec, trials)
    winner = trial.spec
    out = storage_path(out) if out is not None else export_path(spec)
    merge = spec.export.merge if merge is None else merge
    if out.exists():
        previous = out / TRIAL_FILE
        if not is_written_by_sdtune(out, TRIAL_FILE):
            raise ExportRefused(f"{out} exists and is not an sdtune export: choose another --out / export.dir")
        earlier = json.loads(previous.read_text()) if previous.is_file() else {}  # none: an upload cut short
        same = (earlier.get("trial_id"), earlier.get("checkpoint")) == (trial.trial_id, str(trial.checkpoint))
        if same and (out / MERGED_DIR).is_dir() == merge:
            log(f"best trial {trial.trial_id}: {spec.search.metric} = {trial.score(spec.search.metric):.6g}; "
                f"its export is up to date: {out}")  # fmt: skip
            return out
    run_id = tracker.find_trial_run(trial.trial_id)
    record = trial_record(spec, trial, run_id, tracker.find_sweep())
    # fp32 on CPU whatever the trial trained in: merged weights must not lose digits to a bf16 round trip.
    base_spec = winner.model.model_copy(update={"dtype": "float32"})
    model, tokenizer = load_base_model(base_spec, "cpu", log=logger.info)
    with local_copy(trial.checkpoint / ADAPTER_DIR) as adapter:
        tuner = sdt.load(model, adapter)

    def write(staging: Path) -> None:
        adapter_config = write_adapter(staging, tuner, winner)
        (staging / JOB_FILE).write_text(winner.to_yaml())
        write_json(staging / TRIAL_FILE, record)
        (staging / CARD_FILE).write_text(model_card(winner, record, adapter_config, out, merged=merge))
        if merge:
            save_merged(tuner, tokenizer, staging / MERGED_DIR)  # last touch of the tuner: merging ends it
        if spec.export.register_model:
            register_staged_export(spec, tracker, staging, record)

    write_directory(out, write, marker=TRIAL_FILE)
    registered = record["mlflow"]["registered_model"]
    log(f"best trial {trial.trial_id}: {spec.search.metric} = {record['value']:.6g} ({spec.search.mode})")
    if registered:
        log(f"registered as {registered['name']} version {registered['version']} (alias {CHAMPION_ALIAS})")
    log(f"exported to {out}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The files


def write_adapter(directory: Path, tuner: sdt.Tuner, spec: JobSpec) -> dict[str, Any]:
    """``adapter_model.safetensors`` and ``adapter_config.json`` in ``directory``; returns the config."""
    description = sdt.io.describe(tuner, adapter_metadata(tuner, spec))
    sdt.io.write_files(directory, tuner, description)
    return description


def adapter_metadata(tuner: sdt.Tuner, spec: JobSpec) -> dict[str, Any]:
    """What ``adapter_config.json`` adds to :func:`sdt.save`'s description, for readers that do not parse ``sdt``.

    ``selected_counts``: per layer, how many entries the selection keeps along each of its axes (Mamba:
    ``channels`` k_c and ``states`` k_s per channel; Mamba-2 also ``groups`` and ``inputs``).
    ``base_model`` (from :func:`sdt.save`) is what ``from_pretrained`` loads, the cache path for the builtin
    digits base; ``base_model_source`` is how the job named it.
    """
    config = tuner.config
    selected_counts = {
        layer: {axis: int(indices.shape[-1]) for axis, indices in selection.items()}
        for layer, selection in (tuner.selection or {}).items()
    }
    counts = list(selected_counts.values())
    return {
        "method": config.method,
        "description": config.describe(counts[0] if counts and all(c == counts[0] for c in counts) else None),
        "ranks": {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha},
        "ratios": {
            "channels_frozen": config.channels_frozen,
            "states_frozen": config.states_frozen,
            "inputs_frozen": config.inputs_frozen,
        },
        "targets": {"lora": list(config.lora_targets), "sdt": list(config.sdt_targets)},
        "selected_counts": selected_counts,
        "base_model_source": spec.model.model_dump(mode="json", exclude_defaults=True),
        "sdtune_version": __version__,
    }


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


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_numpy_scalar) + "\n")


def _numpy_scalar(value: Any) -> Any:
    # Ray Tune samples randint / choice values as numpy scalars, which json cannot write.
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def save_merged(tuner: sdt.Tuner, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """The adapter baked into the base weights, saved with the tokenizer as a plain transformers directory."""
    model = tuner.merge()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def model_card(
    spec: JobSpec, record: Mapping[str, Any], adapter_config: Mapping[str, Any], out: StoragePath, merged: bool
) -> str:
    """``README.md``: what the adapter is, how well it did, and how to load it."""
    base = adapter_config["base_model"]
    source = ", ".join(f"{key}: {value}" for key, value in adapter_config["base_model_source"].items())
    hyperparameters = ", ".join(f"`{key}` = {value}" for key, value in record["hyperparameters"].items())
    lines = [
        f"# {spec.export.registered_model_name or spec.name}",
        "",
        f"A `{adapter_config['method']}` adapter (sdtune {adapter_config['sdtune_version']}), the best trial of "
        f"the sweep `{spec.name}`.",
        "",
        f"- base model: `{base}` ({source})" if base else f"- base model: built by sdtune ({source})",
        f"- method: {adapter_config['description']}",
        f"- trainable parameters: {adapter_config['num_trainable_parameters']:,}",
        f"- {record['metric']}: {record['value']:.6g} ({record['mode']}), trial `{record['trial_id']}`"
        + "".join(f", {key} {record['metrics'][key]}" for key in POSITION_KEYS if key in record["metrics"]),
        f"- hyperparameters of the trial: {hyperparameters or 'none searched'}",
        "",
        "## Loading",
        "",
        "```python",
        "import sdt",
        *(
            [
                "from transformers import AutoModelForCausalLM",
                "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            ]
            if base
            else [
                "from pipeline.config import load_job",
                "from pipeline.models import load_base_model",
                "",
                f'base, tokenizer = load_base_model(load_job("{out / JOB_FILE}").model, "cpu")',
            ]
        ),
        f'model = sdt.load(base, "{out}/").model',
        "```",
    ]
    if merged:
        lines += [
            "",
            f"`{MERGED_DIR}/` holds the adapter merged into the base weights, a plain transformers model:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{out / MERGED_DIR}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{out / MERGED_DIR}")',
            "```",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The registry


def register_staged_export(spec: JobSpec, tracker: SweepTracker, staging: Path, record: dict[str, Any]) -> None:
    """Register the export being written in ``staging`` (:func:`register_export`) and note the version in its
    ``trial.json``, locally and among the artifacts. Without an MLflow run for the trial, warn and skip."""
    run_id = record["mlflow"]["run_id"]
    if run_id is None:
        logger.warning(
            "no MLflow run for trial %s in experiment %r: the export is not registered",
            record["trial_id"], tracker.experiment_name,
        )
        return
    name = spec.export.registered_model_name or spec.name
    record["mlflow"]["registered_model"] = register_export(tracker, run_id, staging, name)
    write_json(staging / TRIAL_FILE, record)
    tracker.client.log_artifact(run_id, str(staging / TRIAL_FILE), ARTIFACT_PATH)


def register_export(tracker: SweepTracker, run_id: str, directory: Path, name: str) -> dict[str, Any]:
    """Log ``directory`` as the ``export`` artifacts of ``run_id``, make them a new version of the registered model
    ``name`` (created when missing) and point the alias ``champion`` at it. Returns name, version and source."""
    client = tracker.client
    client.log_artifacts(run_id, str(directory), ARTIFACT_PATH)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # The artifacts' resolved location, as MLflow's own examples pass it (RunsArtifactRepository.get_underlying_uri):
    # the version then loads from its source without the tracking store resolving a runs:/ URI.
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
    # The same trial exported again is the same model: its version is reused, not a new one made.
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    same = [v for v in versions if v.name == name and v.source == source]
    model_version = same[0] if same else client.create_model_version(name, source=source, run_id=run_id)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, model_version.version)
    return {"name": name, "version": model_version.version, "alias": CHAMPION_ALIAS, "source": source}


__all__ = [
    "CHAMPION_ALIAS",
    "export_best",
    "export_path",
    "export_trials",
]
