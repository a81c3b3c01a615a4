"""Ray Tune callbacks of a sweep, run in the Tune driver: MLflow mirroring, each trial's cost, the console's lines
and progress display, and the trials handed back to the command that started the sweep."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ray.tune import Callback

from pipeline.compat import tune as tune_compat
from pipeline.results.arms import trial_label
from pipeline.results.costs import TRIAL_PARTS, trial_cost, unreported_cost
from pipeline.results.outcomes import (
    TUNE_ERROR,
    TUNE_TERMINATED,
    checkpoint_reports,
    error_line,
    is_metric,
    metric_on_test,
    reached_the_end,
    trial_dir,
)
from pipeline.results.tracking import BATCHING_TAG, ERROR_TAG, SweepTracker
from pipeline.spec.job import JobSpec, TrialSpecs
from pipeline.storage.layout import ADAPTER_DIR, CHECKPOINT_KEY, COST_FILE
from pipeline.storage.paths import StoragePath, local_copy, reported_path

logger = logging.getLogger(__name__)


def guarded(what: str, action, *args, strict: bool = False) -> Any:
    """``action(*args)``; tracking must not end a long sweep, so an error is logged and swallowed unless
    ``strict``."""
    try:
        return action(*args)
    except Exception:
        if strict:
            raise
        logger.exception("MLflow tracking failed (%s); the sweep goes on", what)
        return None


class TrialCostCallback(Callback):
    """Where each trial's wall time went (:func:`pipeline.results.costs.trial_cost`): the driver notes when a trial
    starts and ends, the worker's last report says how long it spent in each phase. Written to
    ``<trial dir>/cost.json`` and logged as ``cost/<part>_s`` metrics on the trial's MLflow run."""

    def __init__(self, spec: JobSpec, tracker: SweepTracker, gpus_per_trial: float):
        self.spec, self.tracker, self.gpus_per_trial = spec, tracker, gpus_per_trial
        self._started: dict[str, float] = {}
        self._placed: dict[str, float] = {}

    def setup(self, **info) -> None:  # a restored copy carries the placements of the run it was pickled in (or none)
        self._placed = {}

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._started[trial.trial_id] = time.time()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        # Each report carries its worker group's placement; a group Ray Train restarted reports a later one, and the
        # trial's GPU time began at the first.
        placed = result.get("time/placed")
        if placed is not None:
            self._placed[trial.trial_id] = min(placed, self._placed.get(trial.trial_id, placed))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._record(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._record(trial)

    def _record(self, trial) -> None:
        started, ended = self._started.pop(trial.trial_id, None), time.time()
        placed = self._placed.pop(trial.trial_id, None)
        if started is None:  # it started in an earlier run of the driver: its start is unknown
            return
        report = trial.last_result or {}
        if report.get("time/report_at", 0.0) >= started:
            cost = trial_cost(started, ended, report, self.gpus_per_trial, placed)
        else:  # no report of this run (it failed before its first: its last result is an earlier run's)
            cost = unreported_cost(started, ended, self.gpus_per_trial)
        directory = trial_dir(self.spec, trial.trial_id)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / COST_FILE).write_text(json.dumps(cost, indent=2, sort_keys=True) + "\n")
        metrics = {f"cost/{part}_s": cost[part] for part in ("queued", "wall", *TRIAL_PARTS) if part in cost}
        guarded(
            f"cost of trial {trial.trial_id}", self.tracker.log_metrics, trial.trial_id, metrics, report.get("step", 0)
        )


@dataclass(frozen=True)
class Ledger:
    trials: list  # Ray Tune's Trial objects, as they stand at the experiment's end
    started: bool  # whether any trial started in this run of the driver
    cut_short: frozenset[str]  # the trials this run stopped before they ended (Tune calls them TERMINATED)
    specs: TrialSpecs  # each trial's resolved spec

    @property
    def unfinished(self) -> bool:
        """Whether a trial was cut short or is still pending."""
        return bool(self.cut_short) or any(trial.status == "PENDING" for trial in self.trials)


def ended_ids(trials: list) -> set[str]:
    """The trials (Ray Tune's, or outcomes) whose status says they ended: trained, stopped early, or failed."""
    return {trial.trial_id for trial in trials if trial.status in (TUNE_TERMINATED, TUNE_ERROR)}


class TrialLedger(Callback):
    """Hands Ray Tune's trials of a sweep, as they stand at its end, to the command that ran it (in memory, not
    read back from disk), with whether the run left any trial unfinished.

    A restored sweep runs the callbacks pickled with it, not ones the resuming command creates, so the ledger
    keeps its record in a class-level table under the sweep directory: :meth:`take` finds it whichever instance
    recorded it.
    """

    _ended: ClassVar[dict[str, Ledger]] = {}

    def __init__(self, specs: TrialSpecs):
        self.specs = specs
        self.sweep_dir = str(specs.spec.sweep_dir.resolve())
        self._started: set[str] = set()
        self._ended_trials: set[str] = set()
        self._ended_before: set[str] | None = None  # the trials a resumed sweep had ended already

    def setup(self, **info) -> None:  # a restored copy carries the sets of the run it was pickled in
        self._started, self._ended_trials, self._ended_before = set(), set(), None

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._ended_before is None:  # the first step: the experiment's trials as it was restored
            self._ended_before = ended_ids(trials)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._started.add(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended_trials.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended_trials.add(trial.trial_id)

    def on_experiment_end(self, trials: list, **info) -> None:
        # Tune sets a trial it stops (a signal) TERMINATED, also one that had not reported yet. No step at all: the
        # restored sweep had nothing left to run.
        ended = self._ended_trials | (ended_ids(trials) if self._ended_before is None else self._ended_before)
        stopped = {
            trial.trial_id for trial in trials if trial.status == TUNE_TERMINATED and trial.trial_id not in ended
        }
        cut_short = frozenset(stopped | (self._started - self._ended_trials))
        TrialLedger._ended[self.sweep_dir] = Ledger(list(trials), bool(self._started), cut_short, self.specs)

    @classmethod
    def take(cls, sweep_dir: StoragePath) -> Ledger:
        """The record of the sweep in ``sweep_dir`` that ended in this process."""
        return cls._ended.pop(str(sweep_dir))


class MLflowSweepCallback(Callback):
    """Ray Tune callback (runs in the Tune driver) that mirrors trials into a :class:`SweepTracker`.

    - ``setup``: starts (or reuses) the parent run.
    - ``on_trial_start``: the trial's child run, named by its arm label, with the flattened ``trial.config`` as
      params; for a trial that trained before (a resumed sweep), the report of each of its checkpoints that the
      run lacks (:meth:`reconcile`).
    - ``on_trial_result``: the training metrics of the result (:meth:`is_metric`) at ``result["step"]``, else at
      ``training_iteration``, each point once (:meth:`SweepTracker.log_report`); its batch layout as a tag.
    - ``on_trial_complete``: FINISHED, after logging the ``adapter/`` folder of the trial's latest checkpoint
      (``result["checkpoint_path"]`` as Train V2's TuneReportCallback adds it, or ``trial.checkpoint``) when it
      is a local directory, and how far it trained (``epochs_reached``; an ASHA-stopped trial completes normally
      in Tune, so it is FINISHED too, tagged ``sdtune.stopped_early``).
    - ``on_trial_error``: FAILED. A trial that Tune retries (``on_trial_recover``) stays RUNNING.
    - ``on_experiment_end``: KILLED for every child still open. Tune calls it after an interrupted run (Ctrl+C,
      SIGUSR1) or an exception in the loop, and by then it has already set the stopped trials' status to
      TERMINATED, so the callback goes by the runs it opened, not by ``trial.status``. With ``finish_sweep`` it
      also terminates the parent: KILLED when trials were cut short, else FINISHED.

    A second Ctrl+C (a KeyboardInterrupt) or a killed driver skips ``on_experiment_end``: the caller should call
    ``tracker.finish_sweep("KILLED")`` in its own ``except KeyboardInterrupt``, and a resumed sweep reopens and
    reuses every run anyway.

    Tracking must not end a long sweep: errors are logged and swallowed unless ``strict``.
    """

    def __init__(self, specs: TrialSpecs, tracker: SweepTracker, finish_sweep: bool = False, strict: bool = False):
        self.specs, self.tracker = specs, tracker
        self.finish_sweep = finish_sweep
        self.strict = strict
        self._checkpoints: dict[str, str] = {}  # trial id -> latest reported checkpoint path

    def _guard(self, what: str, action, *args) -> Any:
        return guarded(what, action, *args, strict=self.strict)

    def setup(self, **info) -> None:
        self._guard("start sweep", self.tracker.start_sweep)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        config = dict(trial.config or {})
        label = trial_label(config, self.specs.of(trial.trial_id, config).method.name)
        self._guard(f"start trial {trial.trial_id}", self.tracker.trial_run, trial.trial_id, config, label)
        self._guard(f"reports of trial {trial.trial_id}'s checkpoints", self.reconcile, trial.trial_id)

    def reconcile(self, trial_id: str) -> None:
        """The report of every checkpoint the trial has in storage, logged where its MLflow run lacks it. When a sweep
        stops (Ctrl+C, SIGTERM, a killed driver), Tune stops taking results at once while the trials' processes end
        seconds later: a report made in between is saved with its checkpoint, which Ray Train resumes from, but never
        reaches Tune or MLflow. The checkpoint holds it (:func:`pipeline.results.outcomes.checkpoint_reports`)."""
        recovered = []
        for report in checkpoint_reports(self.specs.spec, trial_id):
            metrics = {key: value for key, value in report.items() if is_metric(key)}
            if self.tracker.log_report(trial_id, metrics, report["step"]):
                recovered.append(report["step"])
        if recovered:
            logger.info("trial %s: the reports of its checkpoints at steps %s logged to MLflow", trial_id, recovered)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get(CHECKPOINT_KEY):
            self._checkpoints[trial.trial_id] = str(result[CHECKPOINT_KEY])
        metrics = {key: value for key, value in result.items() if is_metric(key)}
        step = result.get("step")
        step = result.get("training_iteration", iteration) if step is None else step
        self._guard(f"metrics of trial {trial.trial_id}", self.tracker.log_report, trial.trial_id, metrics, step)
        if result.get("batching"):
            tags = {BATCHING_TAG: result["batching"]}
            self._guard(f"batch layout of trial {trial.trial_id}", self.tracker.tag_trial, trial.trial_id, tags)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        adapter = self._adapter_dir(trial)
        if adapter is not None:
            with local_copy(adapter) as local:
                self._guard(f"artifacts of trial {trial.trial_id}", self.tracker.log_artifacts, trial.trial_id, local)
        report = trial.last_result or {}
        trial_spec = self.specs.of(trial.trial_id, dict(trial.config or {}))
        stopped = not reached_the_end(trial_spec, report)
        end = (trial.trial_id, stopped, report.get("epoch"), trial_spec.training.epochs)
        self._guard(f"end of trial {trial.trial_id}", self.tracker.record_trial_end, *end)
        self._guard(f"finish trial {trial.trial_id}", self.tracker.finish_trial, trial.trial_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        # The trial's local error file: the copy in its storage (trial.get_error) is synced only later.
        reason = error_line(tune_compat.trial_error(trial))
        self._guard(f"error of trial {trial.trial_id}", self.tracker.tag_trial, trial.trial_id, {ERROR_TAG: reason})
        self._guard(f"fail trial {trial.trial_id}", self.tracker.finish_trial, trial.trial_id, "FAILED")

    def on_experiment_end(self, trials: list, **info) -> None:
        killed = self._guard("kill open trials", self.tracker.finish_open_trials, "KILLED")
        if killed:
            logger.warning("MLflow runs of trials %s marked KILLED: the sweep ended before they did", killed)
        if self.finish_sweep:
            self._guard("finish sweep", self.tracker.finish_sweep, "KILLED" if killed else "FINISHED")

    def _adapter_dir(self, trial) -> StoragePath | None:
        """The ``adapter/`` folder of the trial's latest checkpoint, in the sweep's storage."""
        candidates = [self._checkpoints.get(trial.trial_id), (trial.last_result or {}).get(CHECKPOINT_KEY)]
        candidates.append(tune_compat.trial_checkpoint_path(trial))
        for path in filter(None, candidates):
            adapter = reported_path(self.tracker.spec.sweep_dir, path) / ADAPTER_DIR
            if adapter.is_dir():
                return adapter
        return None


class ProgressCallback(Callback):
    """The console of a sweep (:class:`pipeline.sweep.console.SweepConsole`): a line per trial event, and the progress
    each running trial's rank 0 writes (:class:`pipeline.sweep.console.TrialProgress`), read at most every
    :data:`pipeline.sweep.console.REFRESH_S` seconds. Tune pickles its callbacks into ``tuner.pkl``: the console, which
    holds the terminal, is made in ``setup`` and never pickled."""

    staged = False  # a sweep resumed from a driver of before sdtune staged trials pickled none

    def __init__(self, specs: TrialSpecs, staged: bool = False):
        self.specs, self.spec = specs, specs.spec
        # whether Tune runs one trial more than train at once (pipeline.sweep.tune.trials_at_once): then a trial's start
        # is announced at its worker's first progress, where there is progress (not in object storage)
        self.staged = staged
        self._console = None
        self._polled = 0.0
        self._started: dict[str, float] = {}  # trial id -> when this run of the driver started it

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_console": None}

    def setup(self, **info) -> None:
        from pipeline.sweep.console import SweepConsole

        self._console = SweepConsole(self.spec.search.metric, self.spec.training.epochs)
        self._started = {}

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._started[trial.trial_id] = time.time()
        announce_now = not self.staged or not isinstance(self.spec.sweep_dir, Path)
        self._console.started(trial.trial_id, self._label(trial), announce=announce_now)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._console.track(trial.trial_id, self._label(trial))
        self._console.reported(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._console.track(trial.trial_id, self._label(trial))
        self._console.refresh({trial.trial_id: self._progress(trial.trial_id)})
        report, spec = trial.last_result or {}, self._spec_of(trial)
        score = f"{self.spec.search.metric} {report.get(self.spec.search.metric, float('nan')):.4g}"
        epochs = f"{report.get('epoch', 0):g} of {spec.training.epochs} epochs"
        if reached_the_end(spec, report):
            test = metric_on_test(self.spec.search.metric)
            tested = f", {test} {report[test]:.4g}" if test in report else ""
            self._console.ended(trial.trial_id, "finished", f"{score}{tested} after {epochs}")
        else:
            self._console.ended(trial.trial_id, "stopped", f"early by the scheduler (ASHA) after {epochs}; {score}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        from pipeline.sweep.console import DRIVER_LOG, REASON_WIDTH, fit, log_dir

        where = log_dir(self.spec.sweep_dir) / DRIVER_LOG  # Ray Tune's record of the failure, with its traceback
        reason = error_line(tune_compat.trial_error(trial))
        self._console.track(trial.trial_id, self._label(trial))
        self._console.ended(trial.trial_id, "failed", f"{fit(reason, REASON_WIDTH)} (full trace in {where})")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        from pipeline.sweep.console import REFRESH_S

        now = time.time()
        if now - self._polled < REFRESH_S:
            return
        self._polled = now
        running = [trial.trial_id for trial in trials if trial.status == "RUNNING"]
        self._console.refresh({trial_id: self._progress(trial_id) for trial_id in running})

    def _progress(self, trial_id: str) -> dict[str, Any] | None:
        """The trial's progress file, unless an earlier run of the trial wrote it (a resumed sweep's, before its
        worker writes again)."""
        from pipeline.trial.progress import read_progress

        progress = read_progress(trial_dir(self.spec, trial_id))
        fresh = progress is not None and progress.get("time", 0.0) >= self._started.get(trial_id, math.inf)
        return progress if fresh else None

    def on_experiment_end(self, trials: list, **info) -> None:
        self._console.close()

    def _spec_of(self, trial) -> JobSpec:
        return self.specs.of(trial.trial_id, dict(trial.config or {}))

    def _label(self, trial) -> str:
        return trial_label(dict(trial.config or {}), self._spec_of(trial).method.name)
