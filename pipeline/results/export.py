"""The export stage: the best trial's adapter as a self-contained directory, optionally merged into a plain
Hugging Face model, and registered in the MLflow model registry as a real MLflow model under the alias ``champion``.

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
export whole (:func:`pipeline.storage.paths.write_directory`: renamed into place locally, so a failure anywhere leaves the
previous export, and the champion it registered, as they were; uploaded with ``trial.json`` last in object storage,
where a failure midway leaves no export rather than a mix of two).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from transformers import PreTrainedTokenizerBase

import sdt
from pipeline import __version__
from pipeline.results.arms import value_label
from pipeline.results.outcomes import TrialOutcome, best_trial, is_metric, metric_on_test
from pipeline.results.tracking import SweepTracker, is_finite_number
from pipeline.spec.job import DataSpec, JobSpec
from pipeline.storage.layout import ADAPTER_DIR, JOB_FILE
from pipeline.storage.paths import StoragePath, is_written_by_sdtune, local_copy, storage_path, write_directory
from pipeline.tasks.formatting import SEP
from pipeline.tasks.registry import get_task
from pipeline.trial.models import load_base_model

logger = logging.getLogger(__name__)

EXPORT_DIR = "export"
MERGED_DIR = "merged"
TRIAL_FILE = "trial.json"
CARD_FILE = "README.md"
ARTIFACT_PATH = "export"  # where the export lands among the trial run's MLflow artifacts
CHAMPION_ALIAS = "champion"
POSITION_KEYS = ("step", "epoch")  # where in training the last report was made
MODEL_EXTRAS_DIR = "sdtune_export"  # in the registered MLflow model: the export directory (adapter, trial.json, ...)
CHECKPOINT_TAG = "sdtune.checkpoint"  # on a model version: the checkpoint it was exported from
TRIAL_RUN_TAG = "sdtune.trial_run_id"


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
    writing nothing, :class:`pipeline.results.outcomes.NoUsableTrialError` when no trial finished with a finite metric and
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
    register = spec.export.register_model

    def write(staging: Path) -> None:
        adapter_config = write_adapter(staging, tuner, winner)
        (staging / JOB_FILE).write_text(winner.to_yaml())
        write_json(staging / TRIAL_FILE, record)
        registered_as = registry_name(spec) if register and run_id is not None else None
        (staging / CARD_FILE).write_text(model_card(winner, record, adapter_config, out, merge, registered_as))
        with tempfile.TemporaryDirectory() as scratch:
            merged = staging / MERGED_DIR if merge else Path(scratch) / MERGED_DIR
            if merge or register:
                save_merged(tuner, tokenizer, merged)  # last touch of the tuner: merging ends it
            normal_file_modes(staging)
            if register:
                register_staged_export(spec, tracker, staging, merged, record)

    write_directory(out, write, marker=TRIAL_FILE)
    tracker.record_winner(winner, trial.trial_id, {k: v for k, v in record["metrics"].items() if is_metric(k)})
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


def normal_file_modes(directory: Path) -> None:
    """Files readable as any other file the user writes: 0666 less the umask (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


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


def base_model_name(spec: JobSpec) -> str:
    """The base as a person names it: ``builtin digits``, the hub name or path, or ``fresh mamba2 (...)``."""
    model = spec.model
    if model.builtin is not None:
        return f"builtin {model.builtin}"
    if model.architecture is not None:
        return f"fresh {model.architecture} (random weights, seed 0; config {json.dumps(model.config, sort_keys=True)})"
    return str(model.name_or_path)


def prompt_format(data: DataSpec) -> str:
    """What the model reads: ``<instruction><text>###`` (a pair: ``...<text>###<text_pair>###``)."""
    pair = f"<text_pair>{SEP}" if "text_pair" in get_task(data.task).column_roles(data) else ""
    return f"{data.instruction}<text>{SEP}{pair}"


def example_prompt(data: DataSpec) -> str:
    """A prompt to show and to try: one of the task's test inputs where it has one to show (the digits task's first
    test image), else the format itself."""
    example = get_task(data.task).example
    return prompt_format(data) if example is None else f"{data.instruction}{example(data)}{SEP}"


def generates_text(data: DataSpec) -> bool:
    """Whether the task's answers are free text (generation) rather than class labels."""
    return get_task(data.task).kind_of(data) == "generation"


def answer_format(spec: JobSpec) -> str:
    if generates_text(spec.data):
        return "the target text, then the tokenizer's end-of-sequence token"
    names = spec.data.label_names
    return f"one of {', '.join(names)}" if names else 'the class index as text ("0", "1", ...)'


def registry_name(spec: JobSpec) -> str:
    return spec.export.registered_model_name or spec.name


def model_card(
    spec: JobSpec,
    record: Mapping[str, Any],
    adapter_config: Mapping[str, Any],
    out: StoragePath,
    merged: bool,
    registered_as: str | None,
) -> str:
    """``README.md``: what the adapter is, how well it did, what it reads and answers, and how to use it
    (``registered_as``: the MLflow registry name it is being registered under)."""
    metric, metrics = record["metric"], record["metrics"]
    test = metric_on_test(metric)
    others = [f"{key} {value:.4g}" for key, value in sorted(metrics.items()) if key.startswith("test/") and key != test]
    test_score = (
        f"{test} **{metrics[test]:.4g}**" + (f" ({', '.join(others)})" if others else "") if test in metrics else None
    )
    hyperparameters = ", ".join(f"`{key}` = {value_label(value)}" for key, value in record["hyperparameters"].items())
    name = registry_name(spec)
    builtin = spec.model.builtin is not None
    load_base = (
        ["from pipeline.tasks.digits import SHIPPED_BASE  # the builtin digits base ships with sdtune", "",
         "base = AutoModelForCausalLM.from_pretrained(SHIPPED_BASE)"]
        if builtin else [f'base = AutoModelForCausalLM.from_pretrained("{adapter_config["base_model"]}")']
    )  # fmt: skip
    lines = [
        "---",  # the metadata block of a Hugging Face model card
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [sdtune, {adapter_config['method']}, {adapter_config['model_type']}]",
        "---",
        "",
        f"# {name}",
        "",
        f"A `{adapter_config['method']}` adapter (sdtune {adapter_config['sdtune_version']}), the best trial of the "
        f"sweep `{spec.name}`.",
        "",
        f"- base model: {base_model_name(spec)}",
        f"- task: `{spec.data.task}`, {get_task(spec.data.task).summary}",
        f"- method: {adapter_config['description']}",
        f"- trainable parameters: {adapter_config['num_trainable_parameters']:,}",
        f"- test score: {test_score}"
        if test_score
        else "- test score: none (no test split, or the trial stopped early)",
        f"- {metric} (validation, which picked it): {record['value']:.4g} ({record['mode']}), trial "
        f"`{record['trial_id']}`" + "".join(f", {key} {metrics[key]}" for key in POSITION_KEYS if key in metrics),
        f"- hyperparameters of the trial: {hyperparameters or 'none searched'}",
        "",
        "## Prompt format",
        "",
        f"The model reads `{prompt_format(spec.data)}` and answers {answer_format(spec)}. For example (the "
        "snippets below use it):",
        "",
        "```python",
        f"PROMPT = {json.dumps(example_prompt(spec.data))}",
        "```",
        "",
        "## Usage",
        "",
    ]
    if registered_as:
        lines += [
            "From the MLflow registry (`MLFLOW_TRACKING_URI` set to the sweep's store), a transformers pipeline:",
            "",
            "```python",
            "import mlflow",
            "",
            f'generator = mlflow.transformers.load_model("models:/{registered_as}@{CHAMPION_ALIAS}")',
            "print(generator(PROMPT, max_new_tokens=1, do_sample=False, return_full_text=False))",
            "```",
            "",
        ]
    if merged:
        lines += [
            f"`{MERGED_DIR}/` holds the adapter merged into the base weights, a plain transformers model:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{out / MERGED_DIR}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{out / MERGED_DIR}")',
            'ids = tokenizer(PROMPT, return_tensors="pt").input_ids',
            "answer = tokenizer.decode(model.generate(ids, max_new_tokens=1, do_sample=False)[0, ids.shape[1]:])",
            "```",
            "",
        ]
    lines += [
        "The adapter on its base, with sdtune's `sdt`:",
        "",
        "```python",
        "import sdt",
        "from transformers import AutoModelForCausalLM",
        *load_base,
        f'model = sdt.load(base, "{out}").model',
        "```",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The registry


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
            pip_requirements=[f"{package}=={version(package).split('+')[0]}" for package in MODEL_REQUIREMENTS],
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


# What the registered model needs to load (MLflow's transformers flavor), pinned to this machine's versions.
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "mambapy")


def answer_tokens(spec: JobSpec) -> int:
    """How many tokens the registered pipeline generates by default: the task's answer length for generation,
    one (the label's first token, which classification scores) otherwise."""
    return spec.data.max_new_tokens if generates_text(spec.data) else 1


__all__ = [
    "CHAMPION_ALIAS",
    "export_path",
    "export_trials",
]
