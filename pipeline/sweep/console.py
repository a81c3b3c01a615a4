"""What a person sees while a sweep runs: one line per trial event (started, evaluated, finished, stopped early,
failed) and a live progress display per running trial (step, loss, eval metric, tokens/s, ETA), labelled with the
trial's arm. What Ray, Ray Tune, Ray Train, DeepSpeed, MLflow and transformers print goes to files in the sweep
directory's ``logs/`` (``--verbose`` also shows it):

- ``logs/driver.log``: the Python log records of the sweep command (Ray, Tune, MLflow, transformers, sdtune);
- ``logs/workers.log``: stdout and stderr of every Ray worker (the trials' Tune functions, Train controllers and
  training workers: DeepSpeed's and transformers' messages, the kernel path of each trial), prefixed with the
  process that wrote them, and the errors the cluster sends the driver (a worker that died). A worker line of
  sdtune's that starts with ``WARNING: `` (:data:`WORKER_WARNING`: a checkpoint that cannot be restored, a trial
  whose workers Ray Train restarts, a CUDA run on the slow reference kernels) is shown on the console too.

A fault is one line on the console, sdtune's, naming the trial, what happened and where its whole trace is (a
trial's ``failed`` line, a worker's warning); a library's own records, errors and their tracebacks included (Ray
Tune's "Trial task failed"), go to the log files only, and a record of sdtune's that carries a traceback shows as
its one line there (the traceback: ``logs/driver.log``).

Progress travels through files, not Ray: rank 0 of a trial writes ``<trial dir>/progress.json`` at its log interval
(:class:`TrialProgress`), and the sweep driver reads it (:func:`read_progress`) from a Tune callback
(:class:`pipeline.sweep.callbacks.ProgressCallback`). A trial's directory is on storage every node sees, as its
checkpoints are, so this works on a cluster too; extra ``ray.train.report`` calls would not do, since ASHA counts
reports.

Switched off for good, whatever the verbosity: Ray Train's print patch (with it, dill's disassembly of functions,
which datasets' fingerprinting runs inside a captured stdout, floods the console as bytecode listings), Ray Tune's
trial table (its columns cut arm labels to 20 characters; the progress display replaces it), on a local cluster
Ray Train's preemption watcher (an error-level "actor restart will fail" per trial, ray-project/ray#53727; it only
watches for node drains, which a single machine does not have) and, without a GPU, DeepSpeed's accelerator probe and
transformers' hints to install the CUDA kernels.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline.compat import ray as ray_compat
from pipeline.compat import transformers as transformers_compat
from pipeline.storage.paths import StoragePath, local_state_dir
from pipeline.trial.progress import MAX_LINE, WORKER_WARNING
from sdt.compat import CompatError

logger = logging.getLogger(__name__)

LOG_DIR = "logs"  # under the sweep's local state directory (the sweep directory unless in object storage)
DRIVER_LOG = "driver.log"
WORKERS_LOG = "workers.log"
LABEL_WIDTH = 60  # an arm label is cut to this many characters in a line (the full label is in MLflow and the report)
REASON_WIDTH = 140  # a failed trial's reason is cut to this (the whole one is in MLflow and the report)
REFRESH_S = 0.5  # the live display is redrawn at most this often
PLAIN_EVERY_S = 15.0  # without a terminal, a running trial's progress line is printed at most this often
# Library loggers that bring their own console handler (all but huggingface_hub's keep their records from the root).
LIBRARY_LOGGERS = ("ray", "mlflow", "transformers", "huggingface_hub")


# ---------------------------------------------------------------------------------------------------------------
# Where library output goes


def log_dir(sweep_dir: StoragePath) -> Path:
    """``logs/`` of the sweep's local state directory: the sweep directory itself unless it is in object storage."""
    return local_state_dir(sweep_dir).resolve() / LOG_DIR


def quiet_environment(local_cluster: bool, gpu: bool) -> dict[str, str]:
    """Environment variables to set before Ray starts, so that Ray's processes inherit them: see the module
    docstring for what each one silences."""
    env = {
        ray_compat.TRAIN_PRINT_PATCH: "0",
        "RAY_AIR_NEW_OUTPUT": "0",  # the legacy Tune reporter honours verbose=0 (the new one prints a header anyway)
        **library_environment(gpu),
    }
    if local_cluster:
        env[ray_compat.TRAIN_PREEMPTION_WATCHER] = "0"
    return env


def library_environment(gpu: bool) -> dict[str, str]:
    """Environment variables that quiet the libraries of any process that loads a model (a trial's workers, the
    command that exports one)."""
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # transformers' "Loading weights" bars
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would warn, in every process, that it fell back to the CPU
    return env


# Python processes Ray starts for one trial besides its training workers: Tune's function trainable, Ray Train's
# controller, placement-group cleaner, result queue, dataset manager and synchronization actor.
RAY_PROCESSES_PER_TRIAL = 6
RAY_FIXED_PROCESSES = 16  # the sweep's own: idle prestarted workers, coordinators, twice Ray's 4 I/O workers


def ray_init_options(local_cluster: bool, concurrent_trials: int, workers_per_trial: int) -> dict[str, Any]:
    """``ray.init`` keywords for a quiet console. On a local cluster the raylet warns ("N Python worker processes
    have been started", a line of ~500 characters that the driver prints whatever ``log_to_driver`` says) once it
    holds 4x its startup concurrency beyond its I/O workers; the concurrency defaults to the CPU count, so 2 cores
    warn at 16 workers, fewer than a quickstart keeps, and 12 trials at once on 16 cores (7 processes each) warn
    too. The concurrency is raised to the CPU count or to what ``concurrent_trials`` keep, whichever is more, so
    that the warning fires only beyond them (it is a limit on processes starting at once, not on their number)."""
    if not local_cluster:
        return {}
    kept = (RAY_PROCESSES_PER_TRIAL + workers_per_trial) * concurrent_trials + RAY_FIXED_PROCESSES
    return ray_compat.startup_concurrency(max(os.cpu_count() or 1, math.ceil(kept / 4)))


class ConsoleFilter(logging.Filter):
    """On the console: sdtune's own warnings and errors (``verbose``: every record). A library's records, its
    errors too, stay in the log file: what they mean for the sweep, sdtune says in its own line."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or (record.name.startswith("pipeline") and record.levelno >= logging.WARNING)


class OneLine(logging.Formatter):
    """A record as one console line of at most :data:`MAX_LINE` characters: its message, and, for a record with a
    traceback, the log file that holds it."""

    def __init__(self, log_file: Path):
        super().__init__()
        self.log_file = log_file

    def format(self, record: logging.LogRecord) -> str:
        traced = f" (traceback in {self.log_file})" if record.exc_info or record.stack_info else ""
        return fit(" ".join(record.getMessage().split()), MAX_LINE - len(traced)) + traced


def route_logs(sweep_dir: Path, verbose: bool, gpu: bool) -> Path:
    """Send this process's log records to ``logs/driver.log`` and keep on the console what :class:`ConsoleFilter`
    lets through; without a GPU, drop transformers' hints to install the CUDA kernels. Returns the log file."""
    import huggingface_hub.utils.logging
    import mlflow  # noqa: F401  (its import gives the "mlflow" logger its console handler, filtered below)
    import transformers.utils.logging as transformers_logging

    directory = log_dir(sweep_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / DRIVER_LOG

    def to_file() -> logging.Handler:  # one per logger: ray.init sets its own format on the handlers of "ray"
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        return handler

    console_filter = ConsoleFilter(verbose)
    # transformers and huggingface_hub add their console handlers on first use: let them, then filter them.
    transformers_logging.get_logger()
    huggingface_hub.utils.logging.get_logger()
    if not verbose:
        transformers_logging.disable_progress_bar()
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for handler in library.handlers:
            handler.addFilter(console_filter)
        if not library.propagate:  # the others reach the root logger's file handler
            library.addHandler(to_file())
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(console_filter)
    if not verbose:
        console.setFormatter(OneLine(path))
    root = logging.getLogger()
    root.addHandler(to_file())
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings of any library: to the file (and the console when verbose)
    if not gpu:
        logging.getLogger(transformers_compat.KERNEL_HINTS_LOGGER).setLevel(logging.ERROR)
    return path


def capture_worker_output(sweep_dir: Path, verbose: bool) -> Path:
    """Write the output of Ray's workers, which the driver receives with ``log_to_driver``, to ``logs/workers.log``
    (and, ``verbose``, to the console as Ray does; otherwise only sdtune's :data:`WORKER_WARNING` lines, cut to
    :data:`MAX_LINE`), with the error messages the cluster sends the driver. Ray has no public switch for this: the
    driver's dispatcher of worker output (:func:`pipeline.compat.ray.worker_output_dispatcher`) gets one more
    handler, and loses its console one unless ``verbose``; its printer of error messages is replaced
    (:func:`pipeline.compat.ray.route_error_messages`). Returns the log file."""
    path = log_dir(sweep_dir) / WORKERS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = path.open("a", buffering=1)

    def write(data: Mapping[str, Any]) -> None:
        if data.get("pid") == "autoscaler":  # the cluster's status every few seconds, which Ray never prints either
            return
        who = data.get("actor_name") or data.get("task_name") or "worker"
        source = "(raylet)" if data.get("pid") == "raylet" else f"({who} pid={data.get('pid')})"
        lines = data.get("lines", [])
        sink.writelines(f"{source} {line}\n" for line in lines)
        if not verbose:  # verbose: Ray's own handler prints every line already
            for line in lines:
                if line.startswith(WORKER_WARNING):
                    print(fit(line, MAX_LINE), file=sys.stderr, flush=True)

    if not verbose:
        try:
            ray_compat.remove_console_worker_output()
        except CompatError as error:
            logger.warning("%s: Ray's workers' output goes to the console too", error)
    ray_compat.add_worker_output_handler("sdtune_workers_log", write)
    try:
        ray_compat.route_error_messages(write, keep_printing=verbose)
    except CompatError as error:
        logger.warning("%s: the errors Ray sends the driver (a worker that died) go to the console only", error)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The display


def fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def number(value: Any, digits: int = 3) -> str:
    return "–" if not isinstance(value, int | float) else f"{value:.{digits}g}"


@dataclass
class TrialRow:
    """What the display knows of one trial."""

    label: str  # the arm and the searched values: "sdlora ch0.8 st0.5 warmup_steps=20 · training.lr=0.01"
    progress: dict[str, Any] | None = None
    metric: float | None = None  # the search metric of its latest report
    epoch: Any = None
    printed_at: float = 0.0  # when its last plain progress line was printed (no terminal)
    unannounced: bool = False  # its "started" line waits for its worker's first progress (a staged sweep)

    @property
    def stepping(self) -> bool:
        """Whether its progress has a step yet (before the first, its worker writes only that it runs)."""
        return "step" in (self.progress or {})


class SweepConsole:
    """The lines and the live display of one sweep, drawn with rich on a terminal and as plain lines elsewhere
    (a log file, CI, a test). Created in the driver; never pickled (it holds the terminal)."""

    def __init__(self, metric: str, epochs: int, stream: TextIO | None = None):
        from rich.console import Console

        self.metric, self.epochs = metric, epochs
        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.rows: dict[str, TrialRow] = {}
        self.live = None
        self.refreshed = 0.0
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=True)
            self.live.start()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def say(self, trial_id: str, event: str, detail: str = "") -> None:
        """One line about one trial: ``evaluated 8cbbd_00001  sdlora ch0.8 st0.5 · training.lr=0.01: epoch 1/3 ...``."""
        label = fit(self.rows[trial_id].label, LABEL_WIDTH)
        line = f"{event:<9} {trial_id}  {label}" + (f": {detail}" if detail else "")
        self.console.print(fit(line, MAX_LINE), markup=False)

    def track(self, trial_id: str, label: str) -> None:
        """Know a trial by its label without a line: one that started before this run of the driver."""
        self.rows.setdefault(trial_id, TrialRow(label))

    def started(self, trial_id: str, label: str, announce: bool = True) -> None:
        """Tune started the trial. In a sweep that stages a trial (one more than run at once, waiting for a GPU)
        Tune's start does not say whether the trial trains or waits: ``announce=False`` defers its "started" line
        to its worker's first progress."""
        self.rows[trial_id] = TrialRow(label, unannounced=not announce)
        if announce:
            self.say(trial_id, "started")

    def reported(self, trial_id: str, result: Mapping[str, Any]) -> None:
        row = self.rows[trial_id]
        self._announce(trial_id, row)  # a trial that reported before the driver read its first progress
        row.metric, row.epoch = result.get(self.metric), result.get("epoch")
        loss = number(result.get("train/loss"))
        detail = f"epoch {row.epoch}/{self.epochs}, {self.metric} {number(row.metric)}, train/loss {loss}"
        self.say(trial_id, "evaluated", detail)

    def ended(self, trial_id: str, event: str, detail: str) -> None:
        """``event``: finished, stopped or failed; ``detail``: how far it got and where it stands."""
        self.flush_progress(trial_id)
        self.say(trial_id, event, detail)
        self.rows.pop(trial_id, None)

    def refresh(self, progress_of: Mapping[str, dict[str, Any] | None]) -> None:
        """New progress of the running trials (trial id -> its progress.json): redraw the live display, or print
        a plain line for a trial whose progress moved (at most every PLAIN_EVERY_S seconds each)."""
        now = time.time()
        for trial_id, progress in progress_of.items():
            row = self.rows.get(trial_id)
            if row is None or progress is None:
                continue
            self._announce(trial_id, row)
            moved = "step" in progress and (row.progress is None or progress["step"] != row.progress.get("step"))
            row.progress = progress
            if self.live is None and moved and now - row.printed_at >= PLAIN_EVERY_S:
                self._print_progress(trial_id, row, now)
        if self.live is not None and now - self.refreshed >= REFRESH_S:
            self.live.update(self._table())
            self.refreshed = now

    def _announce(self, trial_id: str, row: TrialRow) -> None:
        """The deferred "started" line of a staged sweep's trial, once its worker runs."""
        if row.unannounced:
            row.unannounced = False
            self.say(trial_id, "started")

    def flush_progress(self, trial_id: str) -> None:
        """Without a terminal, a trial's progress line if none was printed yet (a trial shorter than the interval)."""
        row = self.rows.get(trial_id)
        if self.live is None and row is not None and row.stepping and row.printed_at == 0.0:
            self._print_progress(trial_id, row, time.time())

    def _print_progress(self, trial_id: str, row: TrialRow, now: float) -> None:
        self.console.print(fit(f"{'progress':<9} {trial_id}  " + " · ".join(self._cells(row)), MAX_LINE), markup=False)
        row.printed_at = now

    def _cells(self, row: TrialRow) -> list[str]:
        progress = row.progress or {}
        tokens, layout = progress.get("tokens_per_s"), progress.get("batching")
        return [
            f"step {progress.get('step', '–')}/{progress.get('total_steps', '–')}",
            f"loss {number(progress.get('loss'))}",
            f"{self.metric} {number(row.metric)}",
            (f"{tokens:,.0f} tokens/s" if tokens else "– tokens/s") + (f" {layout}" if layout else ""),
            f"ETA {duration(progress.get('eta_s'))}",
        ]

    def _table(self):
        from rich.table import Table

        table = Table("trial", "arm", "step", "loss", self.metric, "tokens/s", "ETA", box=None, pad_edge=False)
        for trial_id, row in self.rows.items():
            if not row.stepping:
                table.add_row(trial_id, fit(row.label, LABEL_WIDTH), "starting", "", number(row.metric), "", "")
                continue
            step, loss, _, tokens, eta = self._cells(row)
            table.add_row(
                trial_id,
                fit(row.label, LABEL_WIDTH),
                step.removeprefix("step "),
                loss.removeprefix("loss "),
                number(row.metric),
                tokens.replace(" tokens/s", ""),
                eta.removeprefix("ETA "),
            )
        return table
