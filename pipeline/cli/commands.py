"""The ``sdtune`` command.

Exit codes: 0 done (once the trials are done, a registration or MLflow write that fails is a one-line warning);
1 the run failed (one line says why; the traceback is in ``driver-error.log``, in the sweep directory, or in its local
state directory for a sweep in object storage); 2 bad input, a busy sweep directory, another spec's sweep, an export
target that may not be replaced or a sweep with nothing to export, with nothing started or written; 130 interrupted
(Ctrl+C / SIGTERM): nothing exported, ``sdtune resume`` continues.

``RUN_DIR`` (and ``export --out``) may be a local directory or an object-store URI, as ``output_dir`` may.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from pipeline import __version__
from pipeline.compat import ray as ray_compat
from pipeline.results.outcomes import exception_line, sweep_spec
from pipeline.spec.job import JobSpec, JobSpecError
from pipeline.storage.layout import JOB_FILE
from pipeline.storage.paths import (
    DirectoryBusy,
    StoragePath,
    claim_directory,
    local_state_dir,
    storage_path,
    write_file,
)


class ReadableHelp:
    """Help that reads as words: a value's placeholder is its name (``RUN_DIR``, ``KEY=VALUE``), not its Python
    type (``<list[str]>``); a flag shows none (not ``<bool>``); the usage line names the arguments without braces
    (``sdtune sweep [OPTIONS] JOB``, not ``{job}``)."""

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        for param in params:
            if param.metavar is None:
                param.metavar = "" if getattr(param, "is_flag", False) else param.name.upper()
            # typer 0.2x adds "<str>" beside an argument's name; other typer versions have no type_descriptor
            descriptor = getattr(param, "type_descriptor", None)
            if isinstance(param, TyperArgument) and getattr(descriptor, "annotation", None) is str:
                param.display_type_rich = lambda ctx: None
        return params

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        arguments = {f"{{{p.metavar}}}": p.metavar for p in self.get_params(ctx) if isinstance(p, TyperArgument)}
        return [arguments.get(piece, piece) for piece in pieces]


class Command(ReadableHelp, TyperCommand):
    pass


class Group(ReadableHelp, TyperGroup):
    pass


app = typer.Typer(
    help="Sweep SDT + LoRA fine-tuning of Mamba, Mamba-2 and Jamba models (`sdtune COMMAND --help`: a command's "
    "options and examples).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    cls=Group,
)
command = partial(app.command, cls=Command)

JobArgument = Annotated[Path, typer.Argument(help="A job spec (YAML), e.g. jobs/quickstart.yaml")]
RunDirArgument = Annotated[
    str,
    typer.Argument(
        metavar="RUN_DIR", help="A sweep directory: runs/NAME (the spec's output_dir/name), or its s3://... URI"
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a field of the spec, e.g. `--set training.lr=1e-3` (repeatable)"
    ),
]
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address", metavar="ADDRESS", envvar="RAY_ADDRESS", help="An existing Ray cluster (default: start one here)"
    ),
]
VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Also show what Ray, DeepSpeed, MLflow and transformers print (always kept in RUN_DIR/logs/)",
    ),
]
logger = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"  # where a Ray instance started here serves its dashboard
ERROR_LOG = "driver-error.log"  # in the sweep's local state directory: the traceback of a failed run
INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def load_or_exit(job: Path, overrides: list[str] | None, address: str | None = None, in_sweep: bool = True) -> JobSpec:
    """The validated spec, its relative paths made absolute (Ray workers run elsewhere), checked against this
    machine (files, model, data, metric, tracking server; a trial's resources when Ray will start here); bad
    input: one line naming the field, exit 2."""
    from pipeline.cli.preflight import load_checked

    try:
        return load_checked(job, overrides or [], address, in_sweep=in_sweep)
    except JobSpecError as error:
        raise fail(spec_error_line(job, error)) from None


def spec_error_line(path: Path, error: JobSpecError) -> str:
    """``JOB: field: reason``; a file that cannot be read names itself already."""
    return str(error) if error.where == error.source else f"{path}: {error}"


def start_ray(spec: JobSpec, address: str | None, verbose: bool) -> None:
    """A local Ray instance, or the cluster at ``address`` (checked to fit a trial before anything was written:
    :func:`load_or_exit`, :func:`resume`). Library output goes to ``RUN_DIR/logs/`` (and, ``verbose``, to the console
    too: :mod:`pipeline.sweep.console`)."""
    import ray
    import torch

    from pipeline.cli.preflight import missing_bytecode
    from pipeline.sweep.console import capture_worker_output, quiet_environment, ray_init_options, route_logs

    local = address is None
    gpu = torch.cuda.is_available() if local else spec.resources.use_gpu is not False
    if local and (uncompiled := missing_bytecode()):
        typer.echo(
            f"note: {', '.join(uncompiled)} have no compiled bytecode, so every trial's workers compile them again "
            "(a trial's start-up doubles); once: python -m compileall -q "
            + " ".join(sorted({str(directory) for directory in uncompiled.values()}))
        )
    os.environ.update(quiet_environment(local, gpu))
    # Ray's usage reporting would try the network; none is reachable on a closed cluster.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train's controller polls its workers every 2 s by default, so a trial's end is noticed up to 2 s late,
    # with the GPU idle; a poll of a local actor costs next to nothing.
    os.environ.setdefault(ray_compat.TRAIN_HEALTH_CHECK_INTERVAL_S, "0.5")
    # Ray Train fails a worker group that takes over 60 s to start; each worker imports torch in that window, which
    # a loaded small machine can take longer than that for. Slow is not broken.
    os.environ.setdefault(ray_compat.TRAIN_WORKER_GROUP_START_TIMEOUT_S, "300")
    route_logs(spec.sweep_dir, verbose, gpu)
    # "local": a Ray instance of this command's own, even where another cluster on this machine left its address
    # in Ray's bootstrap file (ray.init() would join that one)
    ray.init(
        address=address or "local",
        log_to_driver=True,
        **ray_init_options(local, spec.resources.max_concurrent_trials, spec.resources.num_workers),
        **(own_state_api() if local else {}),
    )
    capture_worker_output(spec.sweep_dir, verbose)


def own_state_api() -> dict[str, Any]:
    """``ray.init`` keywords that point the workers of a Ray instance started here at its own state API.

    Ray Train frees the CPUs (GPUs) of a trial whose controller died, as it does when Tune stops the trial (ASHA,
    and often at its last report), from a placement-group cleaner that asks the state API whether the controller is
    alive. Without an address that API looks for Ray instances among the machine's processes and fails when there
    are several (another sweep, tests, a second user): the stopped trial's resources stay held, and the trials after
    it wait for them forever. The dashboard, which serves the state API, gets a free port chosen here, and every
    worker its address (``RAY_API_SERVER_ADDRESS``, which the state API reads first)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    workers_env = {ray_compat.STATE_API_ADDRESS: f"http://{LOOPBACK}:{port}"}
    return {"dashboard_host": LOOPBACK, "dashboard_port": port, "runtime_env": {"env_vars": workers_env}}


@contextmanager
def owning(sweep_dir: StoragePath) -> Iterator[None]:
    """This command is the one working on ``sweep_dir``: a second sweep, resume or export of it exits 2."""
    try:
        with claim_directory(sweep_dir):
            yield
    except DirectoryBusy as busy:
        raise fail(f"{sweep_dir}: {busy}") from None


@command("version")
def show_version() -> None:
    """Print the installed sdtune version."""
    typer.echo(__version__)


@command()
def validate(job: JobArgument, overrides: SetOption = None, address: AddressOption = None) -> None:
    """Check a job spec against this machine without starting anything, and say what each method trains.

    Every problem is one line naming the field, with exit code 2. A valid spec: per method the sweep can run and
    kind of layer, what trains (SDT's heads or channels, states and inputs, "(default)" where the family's rule
    set them; LoRA's rank and modules) and the trainable parameters.

    Examples: `sdtune validate jobs/quickstart.yaml` · `sdtune validate job.yaml --set training.lr=3e-3`
    """
    from pipeline.cli.preflight import training_plans

    spec = load_or_exit(job, overrides, address)
    typer.echo(f"{job}: valid ({spec.method.name} on {spec.data.task}, sweep dir {spec.sweep_dir})")
    for line in training_plans(spec):
        typer.echo(f"  {line}")


@command()
def pretrain(
    out: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Where to write the rebuilt base. Default: digits-base-HASH in $SDTUNE_CACHE or ~/.cache/sdtune",
        ),
    ] = None,
) -> None:
    """Rebuild the built-in digits base from its recipe and compare it with the shipped one.

    Sweeps do not need it: `model: {builtin: digits}` loads the base shipped in the
    package. It prints both bases' next-pixel loss on the validation images and their largest weight difference.

    Examples: `sdtune pretrain` · `sdtune pretrain --out pipeline/tasks/digits_base` (refresh the shipped base)
    """
    from pipeline.tasks.digits import SHIPPED_BASE, digits_base_dir, rebuild_digits_base

    out = out or digits_base_dir()
    comparison = rebuild_digits_base(out, log=typer.echo)
    typer.echo(
        f"digits base rebuilt in {out}: validation loss {comparison['validation_loss']:.4f} nats per pixel "
        f"(shipped base {SHIPPED_BASE}: {comparison['reference_validation_loss']:.4f}), largest weight "
        f"difference {comparison['max_weight_difference']:.2g}"
    )


@command()
def train(
    job: JobArgument, overrides: SetOption = None, address: AddressOption = None, verbose: VerboseOption = False
) -> None:
    """Run one trial of a job spec (no Tune) through Ray Train, for debugging.

    Rerun it to resume from its last checkpoint. Prints the last report's metrics and the checkpoint; a trial
    whose loss diverged exits 1.

    Example: `sdtune train jobs/quickstart.yaml --set training.epochs=1`
    """
    spec = load_or_exit(job, overrides, address, in_sweep=False)
    start_ray(spec, address, verbose)
    from pipeline.trial.claims import end_coordinator
    from pipeline.trial.driver import TrialDiverged, build_trainer, raise_if_diverged

    try:
        result = build_trainer(spec, name="train").fit()
    finally:
        end_coordinator(spec.sweep_dir)  # its warmup claim (pipeline.trial.claims)
    try:
        raise_if_diverged(spec, "train")
    except TrialDiverged as diverged:
        raise fail(f"trial failed: {diverged}", 1) from None
    for key, value in sorted((result.metrics or {}).items()):
        typer.echo(f"{key}: {value}")
    typer.echo(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")


@command()
def sweep(
    job: JobArgument, overrides: SetOption = None, address: AddressOption = None, verbose: VerboseOption = False
) -> None:
    """Run the sweep of a job spec, then export the best trial and write the report.

    Ray Tune runs the trials, each a Ray Train worker group; MLflow tracks them. The console shows a line per trial
    event and the progress of the running trials; library logs go to RUN_DIR/logs/. If the sweep directory exists,
    the same spec resumes it and a different one is refused: an earlier sweep's files are never rewritten.

    Examples: `sdtune sweep jobs/quickstart.yaml` · `sdtune sweep job.yaml --set training.lr=3e-3 --set name=lr3`
    · `sdtune sweep job.yaml --address auto` (an existing Ray cluster)
    """
    spec = load_or_exit(job, overrides, address)
    refuse_another_sweep(spec)  # before the directory is claimed: a refused command writes nothing
    refuse_export_target(spec)
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    with owning(spec.sweep_dir):
        job_file = spec.sweep_dir / JOB_FILE
        if job_file.is_file():
            refuse_another_sweep(spec)  # begun by another command since the check above
            typer.echo(f"{spec.sweep_dir}: this sweep exists with the same spec; resuming it")
        else:
            write_file(job_file, spec.to_yaml())
        run_and_finish(spec, address, verbose)


def refuse_another_sweep(spec: JobSpec) -> None:
    """Exit 2 where the spec's sweep directory holds a sweep of another spec (its job.yaml, written once)."""
    if not (spec.sweep_dir / JOB_FILE).is_file():
        return
    earlier = sweep_spec(spec.sweep_dir)
    changed = sorted(_differences(earlier.model_dump(mode="json"), spec.model_dump(mode="json")))
    if changed:
        raise fail(
            f"{spec.sweep_dir} holds another sweep (its job.yaml differs in {', '.join(changed[:5])}): resume "
            f"it with `sdtune resume {spec.sweep_dir}`, or give this one another name (--set name=...)"
        )


def refuse_export_target(spec: JobSpec, out: str | None = None) -> None:
    """Exit 2 where the export would go (``out``, else the spec's) is something sdtune may not replace: checked
    before anything starts, not after the trials (:func:`pipeline.results.export.check_target`)."""
    from pipeline.results.export import ExportRefused, check_target, export_path

    target = export_path(spec, out)
    try:
        if target.exists():
            check_target(target, spec)
    except ExportRefused as refused:
        raise export_refused(refused, out) from None


def export_refused(refused: Exception, out: str | None = None) -> typer.Exit:
    """Exit 2 with the refusal, named by the field that chose the target."""
    return fail(f"{'--out' if out is not None else 'export.dir'}: {refused}")


def _differences(before: object, after: object, prefix: str = "") -> Iterator[str]:
    """The dotted keys where two spec dumps differ."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in before.keys() | after.keys():
            yield from _differences(before.get(key), after.get(key), f"{prefix}.{key}" if prefix else key)
    elif before != after:
        yield prefix


@command()
def resume(run_dir: RunDirArgument, address: AddressOption = None, verbose: VerboseOption = False) -> None:
    """Continue an interrupted sweep, then export and report.

    Finished trials are not run again; their MLflow runs are reused.

    Example: `sdtune resume runs/quickstart`
    """
    spec = spec_of_run(run_dir)
    refuse_export_target(spec)
    if address is not None:
        from pipeline.cli.preflight import check_resources, cluster_resources

        try:
            cpus, gpus, largest_node = cluster_resources(address)
            check_resources(spec, cpus, gpus, largest_node=largest_node)
        except JobSpecError as error:
            raise fail(f"{run_dir}: {error}") from None
    with owning(spec.sweep_dir):
        run_and_finish(spec, address, verbose)


@command()
def export(
    run_dir: RunDirArgument,
    out: Annotated[
        str | None, typer.Option(metavar="DIR", help="Default: the spec's export.dir, else RUN_DIR/export")
    ] = None,
    merge: Annotated[
        bool | None, typer.Option("--merge/--no-merge", help="Also write merged/ (default: the spec's export.merge)")
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Export the best trial of a finished sweep again, here or elsewhere.

    Writes the adapter, trial.json, job.yaml, a model card and, with `--merge`, a plain transformers model, and
    registers it in MLflow as the champion.

    Examples: `sdtune export runs/quickstart --merge --out my-adapter`
    """
    import torch

    from pipeline.results.export import ExportRefused, export_trials
    from pipeline.results.outcomes import NoUsableTrialError, best_trial
    from pipeline.results.tracking import SweepTracker
    from pipeline.sweep.console import library_environment, route_logs

    spec = spec_of_run(run_dir)
    trials = trials_of_run(spec)
    try:  # refused before anything is written
        winner = best_trial(spec, trials).spec
    except NoUsableTrialError as nothing:
        raise fail(f"{spec.sweep_dir}: nothing to export: {nothing}") from None
    config = winner.method.to_sdt_config(seed=winner.training.seed)
    if merge and not config.mergeable:
        raise fail(f"--merge: the best trial's method {config.method!r} trains a state {config.state}, which cannot be "
                   "merged into weights; export it without --merge")  # fmt: skip
    refuse_export_target(spec, out)
    gpu = torch.cuda.is_available()
    with owning(spec.sweep_dir):
        os.environ.update(library_environment(gpu))
        route_logs(spec.sweep_dir, verbose, gpu)
        try:
            export_trials(spec, trials, SweepTracker(spec), out=out, merge=merge, log=typer.echo)
        except ExportRefused as refused:  # replaced by another command since the check above
            raise export_refused(refused, out) from None


@command()
def report(run_dir: RunDirArgument) -> None:
    """Write the report of a sweep again: tables and plots comparing its arms at equal budgets.

    RUN_DIR/report/ gets summary.md (best vs baselines, epochs reached, early stops, where the time went), CSV
    tables, learning curves and the metric against each searched hyperparameter.

    Example: `sdtune report runs/quickstart`
    """
    from pipeline.results.report import write_report
    from pipeline.results.tracking import SweepTracker

    spec = spec_of_run(run_dir)
    write_report(spec, trials_of_run(spec), SweepTracker(spec), log=typer.echo)


@command()
def ui(
    run_dir: Annotated[str | None, typer.Argument(help="A sweep directory; default: $MLFLOW_TRACKING_URI")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback exposes the runs")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on")] = 5000,
) -> None:
    """Serve a sweep's MLflow store (runs, metrics, artifacts, registry) with `mlflow server`.

    Prints the address of the sweep's runs in MLflow's training view, which MLflow 3 does not open by itself.

    Examples: `sdtune ui runs/quickstart` · `sdtune ui runs/quickstart --port 5001`
    """
    from pipeline.results.tracking import ARTIFACTS_DIR, SweepTracker, tracking_uri

    base = f"http://{host}:{port}"
    if run_dir is not None:
        spec = spec_of_run(run_dir)
        store = ["--backend-store-uri", tracking_uri(spec)]
        store += ["--default-artifact-root", (local_state_dir(spec.sweep_dir.resolve()) / ARTIFACTS_DIR).as_uri()]
        where = f"the sweep {spec.name}: {SweepTracker(spec).ui_url(base)}"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        store = ["--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"]]
        where = f"experiments: {base}/#/experiments?workflowType=machine_learning"
    else:
        raise fail("give a sweep directory (runs/<job name>) or set MLFLOW_TRACKING_URI")
    typer.echo(f"MLflow UI on {base}; {where}", err=True)
    # One worker process: one person looks at one sweep (MLflow's default of 4 each import its server).
    # No job execution: its runner and 7 consumer processes, each seconds of CPU to start, serve GenAI scorers, prompt
    # optimisation and trace roll-ups, none of which a fine-tuning sweep's store has. The environment can turn it on.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = [sys.executable, "-m", "mlflow", "server", *store, "--host", host, "--port", str(port), "--workers", "1"]
    os.execv(sys.executable, command)


def spec_of_run(run_dir: str) -> JobSpec:
    """The spec a sweep was started with (``RUN_DIR/job.yaml``); no such sweep: exit 2."""
    try:
        found = (storage_path(run_dir) / JOB_FILE).is_file()
    except (OSError, ValueError) as error:  # object storage that does not answer, a URI that pyarrow cannot open
        raise fail(f"{run_dir}: cannot read it ({' '.join(str(error).split())[:300]})") from None
    if not found:
        raise fail(
            f"{run_dir}: not a sweep directory (no job.yaml); run `sdtune sweep JOB.yaml` first, "
            "or give runs/<job name>"
        )
    try:
        return sweep_spec(run_dir)
    except JobSpecError as error:
        raise fail(spec_error_line(storage_path(run_dir) / JOB_FILE, error)) from None


def trials_of_run(spec: JobSpec) -> list:
    """The trials of a sweep, read back from its directory; a sweep that never ran a trial: exit 2."""
    from pipeline.results.outcomes import load_trials

    try:
        return load_trials(spec)
    except FileNotFoundError as missing:
        raise fail(str(missing)) from None


def announce_plans(spec: JobSpec) -> list[str]:
    """Before any trial: one console line per arm of what it touches per layer type and how many parameters train
    (a hybrid's "layers: mamba 36/36 (SDT+LoRA), attention 4/4 (LoRA), ..."); returns every line of the plans,
    which the sweep's MLflow run keeps (``sdtune validate`` prints them)."""
    from pipeline.cli.preflight import arm_plans
    from pipeline.sweep.console import fit
    from pipeline.trial.progress import MAX_LINE

    plans = arm_plans(spec)
    for label, plan in plans.items():
        summary = ([f"layers: {', '.join(plan.coverage)}"] if plan.coverage else []) + plan.lines()[-1:]
        typer.echo(fit(f"{label}: {'; '.join(summary)}", MAX_LINE))
    return [f"{label}: {line}" for label, plan in plans.items() for line in plan.lines()]


def run_and_finish(spec: JobSpec, address: str | None, verbose: bool) -> None:
    """Run (or resume) the sweep, then export its best trial and write its report; the MLflow parent run ends
    FINISHED, KILLED (interrupted: nothing exported) or FAILED (one line here, the traceback in the sweep dir)."""
    start_ray(spec, address, verbose)
    from pipeline.results.export import ExportRefused, export_trials
    from pipeline.results.report import write_report
    from pipeline.results.tracking import SweepTracker
    from pipeline.sweep.tune import run_sweep

    tracker = SweepTracker(spec, plan=announce_plans(spec))
    resume_hint = f"continue with: sdtune resume {spec.sweep_dir}"
    try:
        outcome = run_sweep(spec, tracker, local_cluster=address is None)
        if outcome.interrupted:
            tracker.finish_sweep("KILLED")
            ended = f"{outcome.num_ended} of {spec.search.planned_trials} trials ended"
            raise fail(f"interrupted: {ended}; nothing exported; {resume_hint}", INTERRUPTED)
        typer.echo(f"trials: {len(outcome.trials)} ({outcome.num_errors} failed)")
        if not outcome.trained:
            typer.echo("every trial of this sweep had ended already: nothing new was trained")
        export_trials(spec, outcome.trials, tracker, log=typer.echo)
        write_report(spec, outcome.trials, tracker, log=typer.echo)
    except KeyboardInterrupt:  # a second Ctrl+C: no time for anything but the parent's status
        tracker.finish_sweep("KILLED")
        raise fail(f"interrupted; nothing exported; {resume_hint}", INTERRUPTED) from None
    except typer.Exit:
        raise
    except ExportRefused as refused:  # export.dir became another sweep's export while the trials ran
        tracker.finish_sweep("FAILED")
        raise export_refused(refused) from None
    except Exception as error:
        log = local_state_dir(spec.sweep_dir) / ERROR_LOG
        log.write_text(traceback.format_exc())
        tracker.finish_sweep("FAILED")
        raise fail(f"sweep failed: {exception_line(error)[:500]} (traceback: {log})", 1) from None
    try:
        tracker.finish_sweep("FINISHED")
    except Exception as error:  # the trials, the export and the report are done: the sweep has not failed
        logger.warning("the sweep's MLflow run is not marked FINISHED: %s", exception_line(error), exc_info=error)
    archive_error_log(spec.sweep_dir)


def archive_error_log(sweep_dir: StoragePath) -> Path | None:
    """A sweep that finished keeps no ``driver-error.log`` of an earlier failed run beside it: the log moves to
    ``logs/``, named by when it was written, with the rest of the sweep's history. Returns where it went."""
    from pipeline.sweep.console import log_dir

    log = local_state_dir(sweep_dir) / ERROR_LOG
    if not log.is_file():
        return None
    written = datetime.fromtimestamp(log.stat().st_mtime, UTC).strftime("%Y%m%dT%H%M%SZ")
    target = log_dir(sweep_dir) / f"driver-error-{written}.log"
    target.parent.mkdir(parents=True, exist_ok=True)
    log.replace(target)
    return target


if __name__ == "__main__":
    app()
