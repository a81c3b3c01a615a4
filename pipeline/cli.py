"""The ``sdtune`` command.

Exit codes: 0 done; 1 the run failed (one line says why; the traceback is in the sweep directory's
``driver-error.log``); 2 bad input or a busy sweep directory, with nothing started or written; 130 interrupted
(Ctrl+C / SIGTERM): nothing exported, ``sdtune resume`` continues.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from pipeline import __version__
from pipeline.config import JobSpec, JobSpecError
from pipeline.results import JOB_FILE, sweep_spec
from pipeline.storage import DirectoryBusy, claim_directory

app = typer.Typer(help="Sweep SDT + LoRA fine-tuning of Mamba, Mamba-2 and Jamba models.", no_args_is_help=True)

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a spec field: --set training.lr=1e-3")]
AddressOption = Annotated[
    str | None, typer.Option("--address", envvar="RAY_ADDRESS", help="An existing Ray cluster (default: start one)")
]
ERROR_LOG = "driver-error.log"  # in the sweep directory: the traceback of a failed run
INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def load_or_exit(job: Path, overrides: list[str] | None, address: str | None = None) -> JobSpec:
    """The validated spec, its relative paths made absolute (Ray workers run elsewhere), checked against this
    machine (files, model, data, metric, tracking server; a trial's resources when Ray will start here); bad
    input: one line naming the field, exit 2."""
    from pipeline.preflight import load_checked

    try:
        return load_checked(job, overrides or [], local_cluster=address is None)
    except JobSpecError as error:
        raise fail(f"{job}: {error}") from None


def start_ray(spec: JobSpec, address: str | None) -> None:
    """A local Ray instance, or the cluster at ``address`` (whose resources must fit a trial: exit 2)."""
    import ray

    from pipeline.preflight import check_resources

    # Ray's usage reporting would try the network; none is reachable on a closed cluster.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, log_to_driver=True)
    if address is not None:
        resources = ray.cluster_resources()
        try:
            check_resources(spec, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
        except JobSpecError as error:
            ray.shutdown()
            raise fail(f"{address}: {error}") from None


@contextmanager
def owning(sweep_dir: Path) -> Iterator[None]:
    """This command is the one working on ``sweep_dir``: a second sweep, resume or export of it exits 2."""
    try:
        with claim_directory(sweep_dir):
            yield
    except DirectoryBusy as busy:
        raise fail(f"{sweep_dir}: {busy}") from None


@app.command("version")
def show_version() -> None:
    """Print the installed sdtune version."""
    typer.echo(__version__)


@app.command()
def validate(job: Path, overrides: SetOption = None, address: AddressOption = None) -> None:
    """Check a job spec against this machine without starting anything."""
    spec = load_or_exit(job, overrides, address)
    typer.echo(f"{job}: valid ({spec.method.name} on {spec.data.task}, sweep dir {spec.sweep_dir})")


@app.command()
def pretrain(
    out: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Where to write the rebuilt base. Default: digits-base-HASH in $SDTUNE_CACHE or ~/.cache/sdtune"),
    ] = None,
) -> None:
    """Rebuild the built-in digits base from its recipe and compare it with the shipped one.

    About a minute on 2 cores. Sweeps do not need it: `model: {builtin: digits}` loads the base shipped in the
    package. It prints both bases' next-pixel loss on the validation images and their largest weight difference.

    Examples: `sdtune pretrain` · `sdtune pretrain --out pipeline/digits_base` (refresh the shipped base)
    """
    from pipeline.digits import SHIPPED_BASE, digits_base_dir, rebuild_digits_base

    out = out or digits_base_dir()
    comparison = rebuild_digits_base(out, log=typer.echo)
    typer.echo(
        f"digits base rebuilt in {out}: validation loss {comparison['validation_loss']:.4f} nats per pixel "
        f"(shipped base {SHIPPED_BASE}: {comparison['reference_validation_loss']:.4f}), largest weight "
        f"difference {comparison['max_weight_difference']:.2g}"
    )


@app.command()
def train(job: Path, overrides: SetOption = None, address: AddressOption = None) -> None:
    """Run one trial (no Tune) through Ray Train, for debugging; rerun it to resume from its last checkpoint."""
    spec = load_or_exit(job, overrides, address)
    start_ray(spec, address)
    from pipeline.trial import build_trainer

    result = build_trainer(spec, name="train").fit()
    for key, value in sorted((result.metrics or {}).items()):
        typer.echo(f"{key}: {value}")
    typer.echo(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")


@app.command()
def sweep(job: Path, overrides: SetOption = None, address: AddressOption = None) -> None:
    """Run the sweep of a job spec (Ray Tune trials, each a Ray Train worker group; MLflow tracks it), then export
    the best trial's adapter and write the report. If the sweep directory exists, the same spec resumes it and a
    different one is refused: the earlier sweep's files are never rewritten."""
    spec = load_or_exit(job, overrides, address)
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    with owning(spec.sweep_dir):
        job_file = spec.sweep_dir / JOB_FILE
        if job_file.is_file():
            earlier = sweep_spec(spec.sweep_dir)
            changed = sorted(_differences(earlier.model_dump(mode="json"), spec.model_dump(mode="json")))
            if changed:
                raise fail(
                    f"{spec.sweep_dir} holds another sweep (its job.yaml differs in {', '.join(changed[:5])}): resume "
                    f"it with `sdtune resume {spec.sweep_dir}`, or give this one another name (--set name=...)"
                )
            typer.echo(f"{spec.sweep_dir}: this sweep exists with the same spec; resuming it")
        else:
            _write_new(job_file, spec.to_yaml())
        run_and_finish(spec, address)


def _differences(before: object, after: object, prefix: str = "") -> Iterator[str]:
    """The dotted keys where two spec dumps differ."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in before.keys() | after.keys():
            yield from _differences(before.get(key), after.get(key), f"{prefix}.{key}" if prefix else key)
    elif before != after:
        yield prefix


def _write_new(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


@app.command()
def resume(run_dir: Path, address: AddressOption = None) -> None:
    """Continue an interrupted sweep (finished trials are not run again), then export and report."""
    spec = spec_of_run(run_dir)
    with owning(spec.sweep_dir):
        run_and_finish(spec, address)


@app.command()
def export(
    run_dir: Path,
    out: Annotated[Path | None, typer.Option(help="Default: the spec's export.dir, else RUN_DIR/export")] = None,
    merge: Annotated[
        bool | None, typer.Option("--merge/--no-merge", help="Also write merged/ (default: the spec's export.merge)")
    ] = None,
) -> None:
    """(Re)export the best trial of a sweep: adapter, trial.json, job.yaml, model card, optionally a merged model."""
    spec = spec_of_run(run_dir)
    from pipeline.export import ExportRefused, export_trials
    from pipeline.results import load_trials
    from pipeline.tracking import SweepTracker

    with owning(spec.sweep_dir):
        try:
            export_trials(spec, load_trials(spec), SweepTracker(spec), out=out, merge=merge, log=typer.echo)
        except ExportRefused as refused:
            raise fail(str(refused)) from None


@app.command()
def report(run_dir: Path) -> None:
    """Plot the metric against each searched hyperparameter and tabulate the best arm against the baselines."""
    spec = spec_of_run(run_dir)
    from pipeline.report import write_report
    from pipeline.results import load_trials
    from pipeline.tracking import SweepTracker

    write_report(spec, load_trials(spec), SweepTracker(spec), log=typer.echo)


@app.command()
def ui(
    run_dir: Annotated[Path | None, typer.Argument(help="A sweep directory; default: $MLFLOW_TRACKING_URI")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback exposes the runs")] = "127.0.0.1",
    port: int = 5000,
) -> None:
    """Serve a sweep's MLflow store (runs, metrics, artifacts, registry) with `mlflow server`."""
    from pipeline.tracking import ARTIFACTS_DIR, tracking_uri

    if run_dir is not None:
        spec = spec_of_run(run_dir)
        store = ["--backend-store-uri", tracking_uri(spec)]
        store += ["--default-artifact-root", (spec.sweep_dir.resolve() / ARTIFACTS_DIR).as_uri()]
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        store = ["--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"]]
    else:
        raise fail("give a sweep directory (runs/<job name>) or set MLFLOW_TRACKING_URI")
    typer.echo(f"MLflow UI on http://{host}:{port}", err=True)
    command = [sys.executable, "-m", "mlflow", "server", *store, "--host", host, "--port", str(port)]
    os.execv(sys.executable, command)


def spec_of_run(run_dir: Path) -> JobSpec:
    """The spec a sweep was started with (``RUN_DIR/job.yaml``); no such sweep: exit 2."""
    if not (run_dir / JOB_FILE).is_file():
        raise fail(f"{run_dir}: not a sweep directory (no job.yaml); run `sdtune sweep JOB.yaml` first, or give runs/<job name>")
    try:
        return sweep_spec(run_dir)
    except JobSpecError as error:
        raise fail(f"{run_dir / JOB_FILE}: {error}") from None


def run_and_finish(spec: JobSpec, address: str | None) -> None:
    """Run (or resume) the sweep, then export its best trial and write its report; the MLflow parent run ends
    FINISHED, KILLED (interrupted: nothing exported) or FAILED (one line here, the traceback in the sweep dir)."""
    start_ray(spec, address)
    from pipeline.export import ExportRefused, export_trials
    from pipeline.report import write_report
    from pipeline.tracking import SweepTracker
    from pipeline.tune import run_sweep

    tracker = SweepTracker(spec)
    resume_hint = f"continue with: sdtune resume {spec.sweep_dir}"
    try:
        outcome = run_sweep(spec, tracker)
        finished = sum(trial.status == "TERMINATED" for trial in outcome.trials)
        if outcome.interrupted:
            tracker.finish_sweep("KILLED")
            raise fail(f"interrupted: {finished} of {len(outcome.trials)} trials finished; nothing exported; {resume_hint}", INTERRUPTED)
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
    except ExportRefused as refused:
        tracker.finish_sweep("FAILED")
        raise fail(str(refused)) from None
    except Exception as error:
        log = spec.sweep_dir / ERROR_LOG
        log.write_text(traceback.format_exc())
        tracker.finish_sweep("FAILED")
        raise fail(f"sweep failed: {type(error).__name__}: {' '.join(str(error).split())[:500]} (traceback: {log})", 1) from None
    tracker.finish_sweep("FINISHED")


if __name__ == "__main__":
    app()
