"""A trial's progress, as its rank 0 writes it for the sweep's console: ``<trial dir>/progress.json`` at every log
interval (:class:`TrialProgress`), read by the sweep driver (:func:`read_progress`). Progress travels through files,
not Ray: a trial's directory is on storage every node sees, as its checkpoints are, and extra ``ray.train.report``
calls would not do, since ASHA counts reports."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.storage.layout import TRIAL_PREFIX
from pipeline.storage.paths import write_file

PROGRESS_FILE = "progress.json"  # in a trial's directory, written by its rank 0
WORKER_WARNING = "WARNING: "  # how sdtune's worker code starts a line the person at the console must see
MAX_LINE = 300  # no console line of sdtune's is longer, a worker's warning included


class TrialProgress:
    """Rank 0 of a sweep's trial writes its training progress to ``<trial dir>/progress.json`` every
    ``training.log_every_steps`` optimizer steps: the step, the steps in all, the loss of that step, tokens/s (of
    the examples' tokens, not padding), the batch layout and the seconds left at the rate so far (evaluations
    included). Other ranks, and runs outside a sweep (``sdtune train``), write nothing."""

    def __init__(self, directory: Path | None, total_steps: int, log_every_steps: int, world: int):
        self.path = directory / PROGRESS_FILE if directory is not None else None
        self.total_steps, self.log_every_steps, self.world = total_steps, log_every_steps, world
        self.started: float | None = None  # when the first step of this run was logged
        self.first_step = 0
        self.tokens, self.last_tokens = 0, 0
        self.batching: str | None = None  # the trial's batch layout (pipeline.tasks.batching), once it trains

    @classmethod
    def of_this_worker(cls, sweep_dir: Path, total_steps: int, log_every_steps: int) -> TrialProgress:
        """For the Ray Train worker calling it: its trial's directory when it is rank 0 of a sweep's trial."""
        import ray.train

        context = ray.train.get_context()
        name = context.get_experiment_name()
        # A sweep in object storage shows no progress: a file rewritten every few seconds there costs a request
        # each time, and the driver would poll the bucket for it.
        mine = context.get_world_rank() == 0 and name.startswith(TRIAL_PREFIX) and isinstance(sweep_dir, Path)
        return cls(sweep_dir.resolve() / name if mine else None, total_steps, log_every_steps, context.get_world_size())

    def begin(self) -> None:
        """Before the first step: the worker runs (its worker group has its GPUs). The console announces a staged
        trial's start then (:class:`SweepConsole`); a row without ``step`` shows as starting."""
        if self.path is not None:
            write_file(self.path, json.dumps({"total_steps": self.total_steps, "time": time.time()}))

    def step(self, step: int, losses: Any, tokens: int) -> None:
        """After optimizer step ``step``: ``losses`` is the trainer's :class:`pipeline.trial.worker.LossLog` (whose last
        logged loss, at a log interval, is this step's) and ``tokens`` this worker's token count since its last
        report (the trainer resets it at each report)."""
        if self.path is None or step % self.log_every_steps:
            return
        loss = losses.logged[-1][1]
        now = time.time()
        self.tokens += tokens - self.last_tokens if tokens >= self.last_tokens else tokens
        self.last_tokens = tokens
        if self.started is None:
            self.started, self.first_step, self.tokens = now, step, 0
        elapsed = now - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0
        row = {
            "step": step,
            "total_steps": self.total_steps,
            "loss": float(loss),
            "tokens_per_s": self.tokens * self.world / elapsed if elapsed > 0 else None,
            "batching": self.batching,
            "eta_s": (self.total_steps - step) / rate if rate > 0 else None,
            "time": now,
        }
        write_file(self.path, json.dumps(row))  # whole or not at all: the driver reads it at any moment


def read_progress(trial_directory: Path) -> dict[str, Any] | None:
    """The latest progress a trial's rank 0 wrote, or None before its first (and always in object storage)."""
    if not isinstance(trial_directory, Path):
        return None
    try:
        return json.loads((trial_directory / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
