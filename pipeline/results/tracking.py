"""MLflow tracking of a sweep: one parent run per sweep, one child run per trial, found again on resume.

Runs are found by tags, never remembered only in memory, so a resumed sweep (a new process, a restored Tuner)
reuses its parent and the children of its trials instead of duplicating them:

- parent: ``sdtune.role = sweep`` and ``sdtune.sweep_dir = <resolved sweep dir>``;
- child: ``mlflow.parentRunId = <parent>`` and ``sdtune.trial_id = <Ray Tune trial id>`` (and ``sdtune.role = trial``).

Everything goes through an :class:`mlflow.MlflowClient` bound to :func:`tracking_uri`; nothing here touches
MLflow's fluent, process-global state (``mlflow.set_experiment`` / ``start_run`` would set ``MLFLOW_EXPERIMENT_ID``
and steer other code in the driver). :class:`pipeline.sweep.callbacks.MLflowSweepCallback` drives a
:class:`SweepTracker` from the Ray Tune driver.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import posixpath
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.results.outcomes import metric_on_test
from pipeline.spec.job import JobSpec
from pipeline.storage.paths import local_state_dir

logger = logging.getLogger(__name__)
CHAMPION_ALIAS = "champion"  # the registry alias of the version a sweep exported last

ROLE_TAG = "sdtune.role"
SWEEP_DIR_TAG = "sdtune.sweep_dir"
TRIAL_ID_TAG = "sdtune.trial_id"
JOB_NAME_TAG = "sdtune.job_name"
ARM_TAG = "sdtune.arm"  # on a trial's run: its arm and searched values, readable ("lora r4 ... · training.lr=0.01")
STOPPED_EARLY_TAG = "sdtune.stopped_early"  # on a trial's run: "true" when the scheduler stopped it before the end
BEST_TRIAL_TAG = "sdtune.best_trial_id"  # on the parent: the exported trial, and its run
BEST_RUN_TAG = "sdtune.best_run_id"
EPOCHS_REACHED = "epochs_reached"  # a trial's metric: the epochs it trained before it ended
# MLflow 3 opens an experiment on its GenAI pages unless told otherwise. The experiment-kind tag says "model
# training" (what MLflow's own kind selector writes); MLflow 3.17 still lands on the kind kept in the browser
# (localStorage, mlflow/mlflow#24498), so the URLs sdtune prints also carry ``workflowType=machine_learning`` and a
# shared view (a runs table layout stored as an experiment tag, restored by ``viewStateShareKey``).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
VIEW_KEY = "sdtune"
VIEW_STATE_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
BATCHING_TAG = "sdtune.batching"  # on a trial's run: its batch layout (packed, grouped, padded), from its reports
ERROR_TAG = "sdtune.error"  # on a FAILED trial's run: why, in one line (MLflow drops NaN metrics, so it is a tag)
PARENT_TAG = MLFLOW_PARENT_RUN_ID  # "mlflow.parentRunId": the UI nests children under it
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
JOB_ARTIFACT = "job.yaml"
PLAN_ARTIFACT = "plan.txt"  # what each arm trains per kind of layer, with its trainable parameters (sdt.plan)
TRIAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's limits (mlflow.utils.validation, 3.17): key 250 characters, param value 6000, 100 params / 1000 metrics
# per log_batch call. Values over the limit are truncated here rather than left to MLFLOW_TRUNCATE_LONG_VALUES.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_BAD_KEY_CHARACTERS = re.compile(r"[^\w./\- :]")  # MLflow allows alphanumerics, _ . / - space and colon


def tracking_uri(spec: JobSpec) -> str:
    """``spec.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store in the sweep directory (in its local
    state directory for a sweep in object storage: SQLite needs a local file)."""
    if spec.tracking.uri:
        return spec.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_tracking_uri(spec)


def default_tracking_uri(spec: JobSpec) -> str:
    return f"sqlite:///{local_state_dir(spec.sweep_dir.resolve())}/{DB_FILE}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), or None for other URIs and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c.d": 2}`` -> ``{"a.b": 1, "c.d": 2}``; lists and empty mappings are leaves."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def clean_key(key: str) -> str:
    """A param or metric key MLflow accepts: odd characters become ``_``, and the key must read as a normalised
    relative path (MLflow rejects ``a//b``, ``/a``, ``..``), capped at 250 characters."""
    key = _BAD_KEY_CHARACTERS.sub("_", str(key))[:MAX_KEY_LENGTH]
    if posixpath.normpath(key) != key or key in ("", ".") or key.startswith(("/", "..")):
        key = key.replace("/", "_")
        if key in ("", ".") or key.startswith(".."):
            key = "_" + key
    return key[:MAX_KEY_LENGTH]


def param_value(value: Any) -> str:
    """A param as MLflow stores it: ``str`` of scalars, JSON of lists and mappings, at most 6000 characters."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple | Mapping):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        logger.warning("param value of %d characters truncated to %d", len(text), MAX_PARAM_VALUE_LENGTH)
        text = text[:MAX_PARAM_VALUE_LENGTH]
    return text


def is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def is_series(value: Any) -> bool:
    """``[[step, value], ...]``: how a report carries a metric measured more often than it reports."""
    return isinstance(value, list | tuple) and all(isinstance(p, list | tuple) and len(p) == 2 for p in value)


def searched_params(spec: JobSpec) -> dict[str, None]:
    """The param keys a search sets, in order: each searched key, or, for a searched mapping (``method`` as a
    grid of mappings), the keys its candidates set (``method.name``, ``method.lora_rank``...)."""
    keys: dict[str, None] = {}
    for key, domain in spec.search.space.items():
        mappings = [value for value in domain.candidates() if isinstance(value, Mapping)]
        keys.update(dict.fromkeys([clean_key(k) for m in mappings for k in flatten(m, key)] or [clean_key(key)]))
    return keys


def _points(metrics: Mapping[str, Any], step: int) -> list[tuple[str, float, int]]:
    """(key, value, step) of every finite number in ``metrics`` at ``step``, and of every point of a series
    (:func:`is_series`) at its own step; keys as MLflow takes them."""
    points = [
        (key, point, at)
        for key, value in metrics.items()
        for at, point in (value if is_series(value) else [(step, value)])
    ]
    return [(clean_key(key), float(value), int(at)) for key, value, at in points if is_finite_number(value)]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _quoted(value: str) -> str | None:
    """``value`` as a string literal of MLflow's filter syntax, or None when it cannot be written as one."""
    if "\\" in value:
        return None
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


class SweepTracker:
    """The MLflow runs of one sweep. Safe to build again in a new process: runs are found by their tags.

    Picklable (Ray Tune pickles the RunConfig, and with it the callbacks, into ``tuner.pkl``): the client is
    rebuilt on first use after unpickling.
    """

    def __init__(self, spec: JobSpec, plan: Sequence[str] = ()):
        self.spec = spec
        self.plan = list(plan)  # what each arm trains (sdt.plan's lines), kept as the parent run's plan.txt
        self.sweep_dir = spec.sweep_dir.resolve()
        self.uri = tracking_uri(spec)
        self.experiment_name = spec.tracking.experiment or spec.name
        self.parent_run_id: str | None = None
        self._trial_runs: dict[str, str] = {}  # trial id -> child run id
        self._open: set[str] = set()  # trials whose child this process set RUNNING and has not terminated
        self._created: set[str] = set()  # the runs this process created: their metric histories start empty
        self._held: dict[str, dict[str, set[int]]] = {}  # run id -> report metric -> the steps its history holds
        self._client: MlflowClient | None = None
        db_file = sqlite_path(self.uri)
        if db_file is not None:
            db_file.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
        self.experiment_id = self._experiment()

    # -- pickling ---------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        # Not the client, which holds a SQLAlchemy engine / HTTP session, nor what this process knows of the runs'
        # histories: another process reads them from MLflow again.
        return {key: value for key, value in self.__dict__.items() if key not in ("_client", "_created", "_held")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client, self._created, self._held = None, set(), {}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # -- experiment and lookups -------------------------------------------------------------------------------

    def _experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                return self.client.create_experiment(
                    self.experiment_name,
                    artifact_location=self.artifact_location(),
                    tags={EXPERIMENT_KIND_TAG: TRAINING_KIND},
                )
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(self.experiment_name)  # created meanwhile
                assert experiment is not None
        if experiment.lifecycle_stage == "deleted":
            logger.warning("restoring the deleted MLflow experiment %r", self.experiment_name)
            self.client.restore_experiment(experiment.experiment_id)
        if (
            EXPERIMENT_KIND_TAG not in experiment.tags
        ):  # made by an older sdtune, or by hand: a kind someone chose stays
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return experiment.experiment_id

    def ui_url(self, base: str) -> str:
        """Where the MLflow UI at ``base`` shows this sweep: the experiment's runs (the training view, not GenAI)
        in sdtune's shared view."""
        query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs?{query}"

    def _share_view(self, parent_run_id: str) -> None:
        """sdtune's runs table (:data:`VIEW_STATE_TAG`): the parent expanded over its trials, best first by the
        search metric, with each trial's arm, searched values, metric, test metric, epochs and early stop."""
        metric = self.spec.search.metric
        params = list(searched_params(self.spec))
        columns = [
            f"tags.`{ARM_TAG}`",
            f"metrics.`{metric}`",
            f"metrics.`{metric_on_test(metric)}`",
            f"metrics.`{EPOCHS_REACHED}`",
            f"tags.`{STOPPED_EARLY_TAG}`",
            *(f"params.`{key}`" for key in params),
        ]
        view = {
            "selectedColumns": columns,
            "runsExpanded": {parent_run_id: True},
            "orderByKey": f"metrics.`{metric}`",
            "orderByAsc": self.spec.search.mode == "min",
        }
        self.client.set_experiment_tag(self.experiment_id, VIEW_STATE_TAG, json.dumps(view))

    def is_searched(self, key: str) -> bool:
        """Whether the flattened spec key ``key`` is set per trial by the search space (``training.lr``, or
        ``method.name`` when ``method`` is searched whole)."""
        return any(key == searched or key.startswith(f"{searched}.") for searched in self.spec.search.space)

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts: beside the database for SQLite (``<sweep dir>/mlartifacts``
        for the default store), under the sweep directory for other database URIs, and the tracking server's or
        file store's own choice otherwise.

        A database store left to itself puts new experiments' artifacts in ``./mlruns`` of the working directory
        of whichever process created them (``--default-artifact-root`` is a server option only)."""
        scheme = urlparse(self.uri).scheme
        if scheme in ("", "file", "http", "https") or scheme.startswith(("databricks", "uc")):
            return None
        db_file = sqlite_path(self.uri)
        root = db_file.parent if db_file is not None else self.sweep_dir
        return (root / ARTIFACTS_DIR).as_uri()

    def _search(self, tags: Mapping[str, str]) -> list[Run]:
        """Active runs of the experiment carrying all ``tags``, oldest first."""
        clauses, unquotable = [], {}
        for key, value in tags.items():
            literal = _quoted(value)
            if literal is None:
                unquotable[key] = value  # filtered below instead
            else:
                clauses.append(f"tags.`{key}` = {literal}")
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                experiment_ids=[self.experiment_id],
                filter_string=" AND ".join(clauses),
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            runs.extend(run for run in page if all(run.data.tags.get(k) == v for k, v in unquotable.items()))
            token = page.token
            if not token:
                return runs

    def _find_one(self, tags: Mapping[str, str], what: str) -> Run | None:
        runs = self._search(tags)
        if len(runs) > 1:
            logger.warning("%d MLflow runs for %s; using the oldest, %s", len(runs), what, runs[0].info.run_id)
        return runs[0] if runs else None

    def _reopen(self, run: Run) -> None:
        if run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")

    def _log_params(self, run: Run, params: Mapping[str, Any]) -> None:
        """Logs the params ``run`` does not have yet. MLflow params are immutable: an existing param with another
        value is kept, with a warning."""
        existing = run.data.params
        new: dict[str, str] = {}
        for raw_key, raw_value in params.items():
            key, value = clean_key(raw_key), param_value(raw_value)
            if key in existing:
                if existing[key] != value:
                    logger.warning(
                        "MLflow run %s keeps param %s=%r (params are immutable); not logging %r",
                        run.info.run_id,
                        key,
                        existing[key],
                        value,
                    )
                continue
            new[key] = value
        params_list = [Param(key, value) for key, value in new.items()]
        for chunk in _chunks(params_list, PARAMS_PER_BATCH):
            self.client.log_batch(run.info.run_id, params=chunk)

    # -- the sweep --------------------------------------------------------------------------------------------

    def _parent_tags(self) -> dict[str, str]:
        return {ROLE_TAG: "sweep", SWEEP_DIR_TAG: str(self.sweep_dir)}

    def find_sweep(self) -> str | None:
        """The parent run id of this sweep directory, without creating one."""
        if self.parent_run_id is None:
            run = self._find_one(self._parent_tags(), f"sweep {self.sweep_dir}")
            self.parent_run_id = run.info.run_id if run else None
        return self.parent_run_id

    def start_sweep(self) -> str:
        """The parent run (created, or reused and set RUNNING again), with the flattened spec as params (except
        the searched keys: :meth:`record_winner` logs the winner's values under them) and the job YAML as the
        ``job.yaml`` artifact; the experiment's shared view is (re)written for it."""
        run = self._find_one(self._parent_tags(), f"sweep {self.sweep_dir}")
        if run is None:
            tags = {**self._parent_tags(), JOB_NAME_TAG: self.spec.name}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.spec.name)
        else:
            self._reopen(run)
        self.parent_run_id = run.info.run_id
        fixed = {k: v for k, v in flatten(self.spec.model_dump(mode="json")).items() if not self.is_searched(k)}
        self._log_params(run, fixed)
        self.client.log_text(self.parent_run_id, self.spec.to_yaml(), JOB_ARTIFACT)
        if self.plan:
            self.client.log_text(self.parent_run_id, "\n".join(self.plan) + "\n", PLAN_ARTIFACT)
        self._share_view(self.parent_run_id)
        return self.parent_run_id

    def record_winner(self, winner: JobSpec, trial_id: str, metrics: Mapping[str, Any]) -> None:
        """The parent run carries the exported trial: its searched values as params under their own keys, its
        last report's ``metrics``, and tags naming the trial and its run."""
        parent = self.find_sweep()
        if parent is None:
            logger.warning("no MLflow run for sweep %s: the winner is not recorded", self.sweep_dir)
            return
        values = {k: v for k, v in flatten(winner.model_dump(mode="json")).items() if self.is_searched(k)}
        self._log_params(self.client.get_run(parent), values)
        self.client.set_tag(parent, BEST_TRIAL_TAG, trial_id)
        run_id = self.find_trial_run(trial_id)
        if run_id is not None:
            self.client.set_tag(parent, BEST_RUN_TAG, run_id)
        self.log_run_metrics(parent, metrics, step=int(metrics.get("step", 0)))

    def finish_sweep(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """Terminates the parent, first marking KILLED any child still RUNNING (so none is left open)."""
        status = self._status(status, TRIAL_STATUSES)
        parent = self.find_sweep()
        if parent is None:
            logger.warning("no MLflow run for sweep %s to finish", self.sweep_dir)
            return
        for run in self.child_runs():
            if run.info.status in ("RUNNING", "SCHEDULED"):
                self.client.set_terminated(run.info.run_id, "KILLED")
        self._open.clear()
        self.client.set_terminated(parent, status)

    def child_runs(self) -> list[Run]:
        """The children of this sweep's parent run, oldest first (none before :meth:`start_sweep`)."""
        parent = self.find_sweep()
        return self._search({PARENT_TAG: parent}) if parent else []

    # -- trials -----------------------------------------------------------------------------------------------

    def _child_tags(self, trial_id: str, parent: str | None = None) -> dict[str, str]:
        parent = parent or self.find_sweep() or self.start_sweep()
        return {PARENT_TAG: parent, TRIAL_ID_TAG: trial_id}

    def find_trial_run(self, trial_id: str) -> str | None:
        """The child run id of ``trial_id``, without creating it (or the parent run) when missing."""
        if trial_id not in self._trial_runs:
            parent = self.find_sweep()
            run = self._find_one(self._child_tags(trial_id, parent), f"trial {trial_id}") if parent else None
            if run is None:
                return None
            self._trial_runs[trial_id] = run.info.run_id
        return self._trial_runs[trial_id]

    def trial_run(self, trial_id: str, params: Mapping[str, Any], label: str | None = None) -> str:
        """The child run of ``trial_id`` (created, or reused and set RUNNING again), with ``params`` flattened
        to dotted keys; a ``label`` (the arm and its searched values) names the run and is its :data:`ARM_TAG`.
        Starts the sweep first if it has not been."""
        tags = self._child_tags(trial_id)
        run = self._find_one(tags, f"trial {trial_id}")
        if run is None:
            extra = {ROLE_TAG: "trial", **({ARM_TAG: label} if label else {})}
            name = f"{label} [{trial_id}]" if label else f"trial-{trial_id}"
            run = self.client.create_run(self.experiment_id, tags={**tags, **extra}, run_name=name)
            self._created.add(run.info.run_id)
        else:
            self._reopen(run)
        self._trial_runs[trial_id] = run.info.run_id
        self._open.add(trial_id)
        self._log_params(run, flatten(params))
        return run.info.run_id

    def _trial_run_id(self, trial_id: str) -> str:
        return self.find_trial_run(trial_id) or self.trial_run(trial_id, {})

    def log_metrics(self, trial_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Logs the finite numbers among ``metrics`` on the trial's run at ``step``, and each metric whose value is
        a series of ``[step, value]`` pairs point by point at the points' own steps; anything else is skipped."""
        self.log_run_metrics(self._trial_run_id(trial_id), metrics, step)

    def log_run_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """:meth:`log_metrics` on any run of the sweep (the parent's, say)."""
        self._log_points(run_id, _points(metrics, step))

    def log_report(self, trial_id: str, metrics: Mapping[str, Any], step: int) -> bool:
        """:meth:`log_metrics` for one of the trial's reports, each point once: a metric's point at a step its
        run's history holds already is left out. A report can come twice: a trial that had finished when the sweep
        was interrupted reports its last checkpoint again on resume, and a resumed trial's checkpoints bring the
        reports Tune never passed on (:meth:`pipeline.sweep.callbacks.MLflowSweepCallback.on_trial_start`).
        Returns whether any point was new."""
        run_id = self._trial_run_id(trial_id)
        held = self._held.setdefault(run_id, {})
        new = []
        for key, value, at in _points(metrics, step):
            if key not in held:  # a run made here has no history yet; one reopened is read once per metric
                history = [] if run_id in self._created else self.client.get_metric_history(run_id, key)
                held[key] = {point.step for point in history}
            if at not in held[key]:
                held[key].add(at)
                new.append((key, value, at))
        self._log_points(run_id, new)
        return bool(new)

    def _log_points(self, run_id: str, points: Sequence[tuple[str, float, int]]) -> None:
        timestamp = int(time.time() * 1000)
        batch = [Metric(key, value, timestamp, at) for key, value, at in points]
        for chunk in _chunks(batch, METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def tag_trial(self, trial_id: str, tags: Mapping[str, str]) -> None:
        run_id = self._trial_run_id(trial_id)
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def log_artifacts(self, trial_id: str, local_dir: str | Path, artifact_path: str = "adapter") -> None:
        self.client.log_artifacts(self._trial_run_id(trial_id), str(local_dir), artifact_path)

    def record_trial_end(self, trial_id: str, stopped_early: bool, epochs: float | None, total_epochs: int) -> None:
        """How far a finished trial trained: the :data:`STOPPED_EARLY_TAG` tag, the :data:`EPOCHS_REACHED` metric,
        and, when the scheduler stopped it, a run name and note that say so (its status stays FINISHED: KILLED
        means an interrupted sweep)."""
        run_id = self._trial_run_id(trial_id)
        self.client.set_tag(run_id, STOPPED_EARLY_TAG, str(stopped_early).lower())
        if epochs is not None:
            self.log_run_metrics(run_id, {EPOCHS_REACHED: epochs})
        if stopped_early:
            name = self.client.get_run(run_id).info.run_name or f"trial-{trial_id}"
            where = f"stopped early at epoch {epochs:g} of {total_epochs}" if epochs is not None else "stopped early"
            if where not in name:
                self.client.set_tag(run_id, "mlflow.runName", f"{name} · {where}")
            note = (
                f"The scheduler (ASHA) {where}: its metrics are those of a shorter training, and it has no test score."
            )
            self.client.set_tag(run_id, "mlflow.note.content", note)

    def metric_history(self, trial_id: str, key: str) -> list[tuple[int, float]]:
        """Every value of ``key`` the trial's run holds, as (step, value) by step (the last, where a step was logged
        twice); empty without a run."""
        run_id = self.find_trial_run(trial_id)
        if run_id is None:
            return []
        points = sorted(self.client.get_metric_history(run_id, clean_key(key)), key=lambda m: (m.step, m.timestamp))
        return sorted({m.step: m.value for m in points}.items())

    def finish_trial(self, trial_id: str, status: Literal["FINISHED", "FAILED", "KILLED"]) -> None:
        """Ends the trial's run with ``status``; a trial that finishes after an earlier failure (a resumed sweep)
        loses the failure's :data:`ERROR_TAG`, so MLflow says what the trial is now."""
        status = self._status(status, TRIAL_STATUSES)
        run_id = self._trial_run_id(trial_id)
        if status == "FINISHED" and ERROR_TAG in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, ERROR_TAG)
        self.client.set_terminated(run_id, status)
        self._open.discard(trial_id)

    def finish_open_trials(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "KILLED") -> list[str]:
        """Terminates the children this tracker set RUNNING and has not terminated; returns their trial ids."""
        trial_ids = sorted(self._open)
        for trial_id in trial_ids:
            self.finish_trial(trial_id, status)
        return trial_ids

    @staticmethod
    def _status(status: str, allowed: Iterable[str]) -> str:
        allowed = tuple(allowed)
        if status not in allowed:
            raise ValueError(f"status must be one of {', '.join(allowed)}, got {status!r}")
        return status


__all__ = [
    "SweepTracker",
    "clean_key",
    "default_tracking_uri",
    "flatten",
    "param_value",
    "sqlite_path",
    "tracking_uri",
]
