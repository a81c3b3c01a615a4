"""Ray Tune callbacks of a sweep, run in the Tune driver: MLflow mirroring and the trials handed back to the
command that started the sweep."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

from pipeline.results import ADAPTER_DIR, CHECKPOINT_KEY, is_metric
from pipeline.storage import local_path
from pipeline.tracking import SweepTracker

logger = logging.getLogger(__name__)


class TrialLedger(Callback):
    """Hands Ray Tune's trials of a sweep, as they stand at its end, to the command that ran it (in memory, not
    read back from disk).

    A restored sweep runs the callbacks pickled with it, not ones the resuming command creates, so the ledger
    keeps the trials in a class-level table under the sweep directory: :meth:`take` finds them whichever instance
    recorded them.
    """

    _ended: dict[str, list] = {}

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = str(sweep_dir)

    def on_experiment_end(self, trials: list, **info) -> None:
        TrialLedger._ended[self.sweep_dir] = list(trials)

    @classmethod
    def take(cls, sweep_dir: Path) -> list:
        """The trials of the sweep in ``sweep_dir`` that ended in this process."""
        return cls._ended.pop(str(sweep_dir))


class MLflowSweepCallback(Callback):
    """Ray Tune callback (runs in the Tune driver) that mirrors trials into a :class:`SweepTracker`.

    - ``setup``: starts (or reuses) the parent run.
    - ``on_trial_start``: the trial's child run, with the flattened ``trial.config`` as params.
    - ``on_trial_result``: the training metrics of the result (:meth:`is_metric`) at ``result["step"]``, else at
      ``training_iteration``.
    - ``on_trial_complete``: FINISHED, after logging the ``adapter/`` folder of the trial's latest checkpoint
      (``result["checkpoint_path"]`` as Train V2's TuneReportCallback adds it, or ``trial.checkpoint``) when it
      is a local directory. An ASHA-stopped trial completes normally in Tune, so it is FINISHED too.
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

    def __init__(self, tracker: SweepTracker, finish_sweep: bool = False, strict: bool = False):
        self.tracker = tracker
        self.finish_sweep = finish_sweep
        self.strict = strict
        self._checkpoints: dict[str, str] = {}  # trial id -> latest reported checkpoint path

    def _guard(self, what: str, action, *args) -> Any:
        try:
            return action(*args)
        except Exception:
            if self.strict:
                raise
            logger.exception("MLflow tracking failed (%s); the sweep goes on", what)
            return None

    def setup(self, **info) -> None:
        self._guard("start sweep", self.tracker.start_sweep)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._guard(f"start trial {trial.trial_id}", self.tracker.trial_run, trial.trial_id, dict(trial.config or {}))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get(CHECKPOINT_KEY):
            self._checkpoints[trial.trial_id] = str(result[CHECKPOINT_KEY])
        metrics = {key: value for key, value in result.items() if is_metric(key)}
        step = result.get("step")
        step = result.get("training_iteration", iteration) if step is None else step
        self._guard(f"metrics of trial {trial.trial_id}", self.tracker.log_metrics, trial.trial_id, metrics, step)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        adapter = self._adapter_dir(trial)
        if adapter is not None:
            self._guard(f"artifacts of trial {trial.trial_id}", self.tracker.log_artifacts, trial.trial_id, adapter)
        self._guard(f"finish trial {trial.trial_id}", self.tracker.finish_trial, trial.trial_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._guard(f"fail trial {trial.trial_id}", self.tracker.finish_trial, trial.trial_id, "FAILED")

    def on_experiment_end(self, trials: list, **info) -> None:
        killed = self._guard("kill open trials", self.tracker.finish_open_trials, "KILLED")
        if killed:
            logger.warning("MLflow runs of trials %s marked KILLED: the sweep ended before they did", killed)
        if self.finish_sweep:
            self._guard("finish sweep", self.tracker.finish_sweep, "KILLED" if killed else "FINISHED")

    def _adapter_dir(self, trial) -> Path | None:
        """The ``adapter/`` folder of the trial's latest checkpoint, when that is a local directory."""
        candidates = [self._checkpoints.get(trial.trial_id), (trial.last_result or {}).get(CHECKPOINT_KEY)]
        checkpoint = getattr(trial, "checkpoint", None)
        if checkpoint is not None:
            candidates.append(getattr(checkpoint, "path", None))
        for path in filter(None, candidates):
            adapter = local_path(path) / ADAPTER_DIR
            if adapter.is_dir():
                return adapter
        return None
