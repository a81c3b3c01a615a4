"""What a sweep produced: every trial's resolved spec, status, last report and latest checkpoint, and the best
trial by the spec's metric and mode. Built in memory from Ray Tune's trials at the end of a sweep, or read back
from the sweep directory with no Ray cluster running (``sdtune export`` / ``report`` on an old run).

A trial's score is its *last* report (Ray Tune's default scope), whose checkpoint is the trial's final adapter:
with ASHA that is where the trial was stopped, otherwise the end of training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.spec.job import JobSpec, TrialSpecs, load_job
from pipeline.storage.layout import (
    CHECKPOINT_KEY,
    CHECKPOINT_PREFIX,
    COST_FILE,
    JOB_FILE,
    TRAINER_STATE,
    TRIAL_PREFIX,
    TUNE_DIR,
)
from pipeline.storage.paths import StoragePath, reported_path, storage_path, subdirectories

# Ray Tune's trial statuses (not MLflow's run statuses, which are FINISHED / FAILED / KILLED).
TUNE_TERMINATED = "TERMINATED"  # finished, or stopped early by the scheduler
TUNE_ERROR = "ERROR"
# The keys of a trial's report that are training metrics (the rest is Ray's bookkeeping: pid, timestamps, ...).
METRIC_PREFIXES = ("eval/", "test/", "train/", "warmup/")
METRIC_NAMES = frozenset({"tokens_per_s", "peak_memory_gib", "trainable_parameters", "epoch"})


def is_metric(key: str) -> bool:
    return key.startswith(METRIC_PREFIXES) or key in METRIC_NAMES


def metric_on_test(metric: str) -> str:
    """``eval/accuracy`` -> ``test/accuracy``."""
    return f"test/{metric.split('/', 1)[-1]}"


class NoUsableTrialError(RuntimeError):
    """No trial of the sweep finished with a finite value of the metric."""


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    status: str  # Ray Tune's: TERMINATED, ERROR, RUNNING, PENDING
    config: dict[str, Any]  # the sampled values, by dotted spec key ("training.lr": 0.01)
    metrics: dict[str, Any]  # the last report
    spec: JobSpec  # the sweep's spec with the sampled values applied: what the trial ran
    cost: dict[str, Any] | None = None  # costs.trial_cost of its last run, when the sweep driver recorded one
    error: str | None = None  # why it failed, in one line (ERROR only)

    @property
    def checkpoint(self) -> StoragePath | None:
        path = self.metrics.get(CHECKPOINT_KEY)
        return reported_path(self.spec.sweep_dir, path) if path else None

    @property
    def stopped_early(self) -> bool:
        """Ended without training to the end, though it did not fail: stopped by the scheduler (ASHA)."""
        return self.status == TUNE_TERMINATED and not reached_the_end(self.spec, self.metrics)

    @property
    def epochs_reached(self) -> float | None:
        """Epochs trained by its last report (completed ones; a report between epochs counts the completed)."""
        return self.metrics.get("epoch")

    def score(self, metric: str) -> float | None:
        """The trial's value of ``metric``, or None when it failed, never reported it, or reported a non-number."""
        value = self.metrics.get(metric)
        if self.status != TUNE_TERMINATED or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if math.isfinite(value) else None


def reached_the_end(spec: JobSpec, report: Mapping[str, Any]) -> bool:
    """Whether ``report`` is the last report of a trial of ``spec`` that trained to the end: every epoch, or
    ``training.max_steps`` optimizer steps. A trial whose last report is not is one the scheduler stopped early."""
    every_epoch = report.get("epoch") == spec.training.epochs
    return every_epoch or bool(spec.training.max_steps and report.get("step", 0) >= spec.training.max_steps)


def trial_dir(spec: JobSpec, trial_id: str) -> StoragePath:
    return spec.sweep_dir.resolve() / f"{TRIAL_PREFIX}{trial_id}"


def checkpoint_reports(spec: JobSpec, trial_id: str) -> list[dict[str, Any]]:
    """The reports the trial's checkpoints in the sweep's storage were made with, by step: a checkpoint's
    ``trainer_state.json`` holds the report that came with it. One that cannot be read is passed over (restoring
    the trial warns of it)."""
    reports = []
    for checkpoint in subdirectories(trial_dir(spec, trial_id), CHECKPOINT_PREFIX):
        try:
            report = json.loads((checkpoint / TRAINER_STATE).read_text()).get("metrics")
        except (OSError, ValueError, AttributeError):  # unreadable, cut short, not a mapping
            continue
        if isinstance(report, dict) and isinstance(report.get("step"), int):
            reports.append(report)
    return sorted(reports, key=lambda report: report["step"])


def outcomes(specs: TrialSpecs, trials: Iterable[Any]) -> list[TrialOutcome]:
    """Ray Tune's ``Trial`` objects as outcomes, in trial-id order, each with its resolved spec."""
    spec, result = specs.spec, []
    for t in sorted(trials, key=lambda t: t.trial_id):
        cost_file = trial_dir(spec, t.trial_id) / COST_FILE
        cost = json.loads(cost_file.read_text()) if cost_file.is_file() else None
        error = error_line(t.get_error()) if t.status == TUNE_ERROR else None
        config, report = dict(t.config), dict(t.last_result or {})
        result.append(TrialOutcome(t.trial_id, t.status, config, report, specs.of(t.trial_id, config), cost, error))
    return result


def error_line(error: BaseException | str | None) -> str:
    """The line of a trial's error that says what went wrong: Ray wraps it in tracebacks, and the last line of
    the message is the original exception's ``Type: message``."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:500]


def exception_line(error: BaseException) -> str:
    """``Type: message`` of an exception raised in this process, on one line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def sweep_spec(run_dir: str | StoragePath) -> JobSpec:
    """The spec a sweep was started with, from ``<run dir>/job.yaml`` (the resolved spec ``sdtune sweep`` wrote)."""
    return load_job(storage_path(run_dir) / JOB_FILE)


def load_trials(spec: JobSpec) -> list[TrialOutcome]:
    """Every trial recorded in ``<sweep dir>/tune``, read back from the sweep's storage."""
    from ray.tune import ExperimentAnalysis

    tune_dir = spec.sweep_dir.resolve() / TUNE_DIR
    if not tune_dir.is_dir():
        raise FileNotFoundError(f"{spec.sweep_dir}: no sweep here (missing {TUNE_DIR}/); run `sdtune sweep` first")
    return outcomes(TrialSpecs(spec), ExperimentAnalysis(str(tune_dir)).trials)


def best_trial(spec: JobSpec, trials: list[TrialOutcome]) -> TrialOutcome:
    """The finished trial with the best finite ``search.metric`` (``search.mode``); failed and NaN trials never win."""
    metric, mode = spec.search.metric, spec.search.mode
    scored = [(trial.score(metric), trial) for trial in trials]
    usable = [(score, trial) for score, trial in scored if score is not None and trial.checkpoint is not None]
    if not usable:
        states = ", ".join(f"{t.trial_id} {t.status} {metric}={t.metrics.get(metric)!r}" for t in trials) or "no trials"
        raise NoUsableTrialError(f"no finished trial with a finite {metric} and a checkpoint ({states})")
    pick = max if mode == "max" else min
    return pick(usable, key=lambda pair: pair[0])[1]
