"""The champion: an export registered in MLflow's model registry as a real MLflow model (the transformers flavor of
the merged model, a ``text-generation`` pipeline, with the export directory beside it), under the alias
``champion``."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from importlib.metadata import distribution, packages_distributions, version
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from pipeline.results.model_card import answer_tokens, example_prompt, registry_name
from pipeline.results.tracking import CHAMPION_ALIAS, SweepTracker
from pipeline.spec.job import JobSpec
from pipeline.storage.layout import CARD_FILE, MERGED_DIR, TRIAL_FILE
from pipeline.storage.paths import normal_file_modes, write_json

ARTIFACT_PATH = "export"  # where the export lands among the trial run's MLflow artifacts
MODEL_EXTRAS_DIR = "sdtune_export"  # in the registered MLflow model: the export directory (adapter, trial.json, ...)
CHECKPOINT_TAG = "sdtune.checkpoint"  # on a model version: the checkpoint it was exported from
TRIAL_RUN_TAG = "sdtune.trial_run_id"
# The modules the registered model needs to load (MLflow's transformers flavor), pinned to this machine's versions.
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "mambapy")

logger = logging.getLogger(__name__)


def register_staged_export(
    spec: JobSpec, tracker: SweepTracker, staging: Path, merged: Path, record: dict[str, Any]
) -> None:
    """Register the export being written in ``staging`` (:func:`register_export`, the merged model in ``merged``)
    and note the version in its ``trial.json``, locally and among the artifacts. Without an MLflow run for the
    trial, warn and skip."""
    run_id = record["mlflow"]["run_id"]
    if run_id is None:
        logger.warning(
            "no MLflow run for trial %s in experiment %r: the export is not registered",
            record["trial_id"],
            tracker.experiment_name,
        )
        return
    name = registry_name(spec)
    record["mlflow"]["registered_model"] = register_export(tracker, spec, record, staging, merged, name)
    write_json(staging / TRIAL_FILE, record)
    tracker.client.log_artifact(run_id, str(staging / TRIAL_FILE), ARTIFACT_PATH)


def register_export(
    tracker: SweepTracker, spec: JobSpec, record: Mapping[str, Any], directory: Path, merged: Path, name: str
) -> dict[str, Any]:
    """Log ``directory`` as the ``export`` artifacts of the trial's run; make the merged model an MLflow model
    (:func:`log_mlflow_model`), a new version of the registered model ``name`` (created when missing), and point
    the alias ``champion`` at it. The version's run is the sweep's parent run (MLflow lists it there under
    "Registered models"); the logged model's source run is the trial's. The same checkpoint exported again is the
    same model: its version is reused. Returns name, version and source."""
    client = tracker.client
    run_id, parent = record["mlflow"]["run_id"], record["mlflow"]["parent_run_id"] or record["mlflow"]["run_id"]
    client.log_artifacts(run_id, str(directory), ARTIFACT_PATH)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    versions = client.search_model_versions(f"name = '{name}'")
    same = [v for v in versions if v.tags.get(CHECKPOINT_TAG) == record["checkpoint"]]
    if same:
        model_version = same[0]
    else:
        logged = log_mlflow_model(tracker, spec, record, directory, merged, name)
        # The logged model's artifact location, not "models:/<id>": MLflow's SQL registry resolves the latter
        # through the process-wide tracking URI (a stray ./mlflow.db when none is set).
        model_version = client.create_model_version(
            name, source=logged.artifact_location, run_id=parent, model_id=logged.model_id,
            tags={CHECKPOINT_TAG: record["checkpoint"], TRIAL_RUN_TAG: run_id, "sdtune.trial_id": record["trial_id"]},
        )  # fmt: skip
    client.set_registered_model_alias(name, CHAMPION_ALIAS, model_version.version)
    return {"name": name, "version": model_version.version, "alias": CHAMPION_ALIAS, "source": model_version.source}


def log_mlflow_model(
    tracker: SweepTracker, spec: JobSpec, record: Mapping[str, Any], directory: Path, merged: Path, name: str
):
    """The merged model as an MLflow logged model of the sweep's experiment: the transformers flavor of a
    ``text-generation`` pipeline (model and tokenizer), with ``directory`` (the export: adapter, trial.json, card)
    in ``sdtune_export/``; an output of the trial's run and of the parent run. Only the client bound to the sweep's
    store is used: MLflow's process-wide state (tracking URI, active run) is left alone."""
    import mlflow.transformers
    from huggingface_hub import ModelCard
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    client = tracker.client
    run_id = record["mlflow"]["run_id"]
    logged = client.create_logged_model(
        tracker.experiment_id, name=name, source_run_id=run_id, model_type="text-generation",
        params={key: str(value) for key, value in record["hyperparameters"].items()},
    )  # fmt: skip
    generator = pipeline(
        "text-generation",
        model=AutoModelForCausalLM.from_pretrained(merged),
        tokenizer=AutoTokenizer.from_pretrained(merged),
    )
    description = Model(
        artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id, model_id=logged.model_id
    )
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "model"
        mlflow.transformers.save_model(
            generator,
            path=str(local),
            task="text-generation",
            mlflow_model=description,
            input_example=example_prompt(spec.data),
            model_card=ModelCard((directory / CARD_FILE).read_text()),
            # Listed, not inferred: inference loads the model again in a subprocess.
            pip_requirements=[requirement(module) for module in MODEL_REQUIREMENTS],
            model_config={"max_new_tokens": answer_tokens(spec), "do_sample": False, "return_full_text": False},
            metadata={"sdtune.trial_id": record["trial_id"], "sdtune.sweep": spec.name},
        )
        shutil.copytree(directory, local / MODEL_EXTRAS_DIR, ignore=shutil.ignore_patterns(MERGED_DIR))
        normal_file_modes(local)
        client.log_model_artifacts(logged.model_id, str(local))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    for run in {run_id, record["mlflow"]["parent_run_id"]} - {None}:
        client.log_outputs(run, [LoggedModelOutput(logged.model_id, step=0)])
    return logged


def requirement(module: str) -> str:
    """The pip requirement of the distribution that installed ``module`` here, at its version without a local build
    tag (``torch==2.13.0``, not ``+cpu``). A module may come from distributions of other names: MLflow's clients
    install ``mlflow`` as ``mlflow-skinny`` (beside ``mlflow-tracing``), scikit-learn is imported as ``sklearn``.
    The module's own name wins where it is one of them (full MLflow installs all three), else the distribution that
    installed most of its files."""
    distributions = packages_distributions().get(module, [])
    if module in distributions or not distributions:
        name = module
    else:
        name = max(distributions, key=lambda d: sum(f.parts[0] == module for f in distribution(d).files or ()))
    return f"{name}=={version(name).split('+')[0]}"
