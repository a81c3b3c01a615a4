"""What a sweep produced: every trial's resolved spec, status, last report and latest checkpoint, and the best
trial by the spec's metric and mode. Built in memory from Ray Tune's trials at the end of a sweep, or read back
from the sweep directory with no Ray cluster running (``sdtune export`` / ``report`` on an old run).

A trial's score is its *last* report (Ray Tune's default scope), whose checkpoint is the trial's final adapter:
with ASHA that is where the trial was stopped, otherwise the end of training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import JobSpec, load_job
from pipeline.storage import local_path

TUNE_DIR = "tune"  # Ray Tune's experiment state, under the sweep dir
JOB_FILE = "job.yaml"  # the resolved spec, under the sweep dir
CHECKPOINT_KEY = "checkpoint_path"  # added to each report by Ray Train's TuneReportCallback
ADAPTER_DIR = "adapter"  # in a trial's checkpoint: the adapter with its selection (sdt.save)
# Ray Tune's trial statuses (not MLflow's run statuses, which are FINISHED / FAILED / KILLED).
TUNE_TERMINATED = "TERMINATED"  # finished, or stopped early by the scheduler
TUNE_ERROR = "ERROR"
# The keys of a trial's report that are training metrics (the rest is Ray's bookkeeping: pid, timestamps, ...).
METRIC_PREFIXES = ("eval/", "test/", "train/", "warmup/")
METRIC_NAMES = frozenset({"tokens_per_s", "peak_memory_gib", "trainable_parameters", "epoch"})


def is_metric(key: str) -> bool:
    return key.startswith(METRIC_PREFIXES) or key in METRIC_NAMES


class NoUsableTrialError(RuntimeError):
    """No trial of the sweep finished with a finite value of the metric."""


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    status: str  # Ray Tune's: TERMINATED, ERROR, RUNNING, PENDING
    config: dict[str, Any]  # the sampled values, by dotted spec key ("training.lr": 0.01)
    metrics: dict[str, Any]  # the last report
    spec: JobSpec  # the sweep's spec with the sampled values applied: what the trial ran

    @property
    def checkpoint(self) -> Path | None:
        path = self.metrics.get(CHECKPOINT_KEY)
        return local_path(path) if path else None

    def score(self, metric: str) -> float | None:
        """The trial's value of ``metric``, or None when it failed, never reported it, or reported a non-number."""
        value = self.metrics.get(metric)
        if self.status != TUNE_TERMINATED or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if math.isfinite(value) else None


def outcomes(spec: JobSpec, trials: Iterable[Any]) -> list[TrialOutcome]:
    """Ray Tune's ``Trial`` objects as outcomes, in trial-id order; each trial's spec is resolved here, once."""
    return [
        TrialOutcome(t.trial_id, t.status, dict(t.config), dict(t.last_result or {}), spec.with_overrides(t.config))
        for t in sorted(trials, key=lambda t: t.trial_id)
    ]


def sweep_spec(run_dir: str | Path) -> JobSpec:
    """The spec a sweep was started with, from ``<run dir>/job.yaml`` (the resolved spec ``sdtune sweep`` wrote)."""
    return load_job(Path(run_dir) / JOB_FILE)


def load_trials(spec: JobSpec) -> list[TrialOutcome]:
    """Every trial recorded in ``<sweep dir>/tune``, read back from disk."""
    from ray.tune import ExperimentAnalysis

    tune_dir = spec.sweep_dir.resolve() / TUNE_DIR
    if not tune_dir.is_dir():
        raise FileNotFoundError(f"{spec.sweep_dir}: no sweep here (missing {TUNE_DIR}/); run `sdtune sweep` first")
    return outcomes(spec, ExperimentAnalysis(str(tune_dir)).trials)


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
