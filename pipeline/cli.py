"""The ``sdtune`` command."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline import __version__
from pipeline.config import JobSpec, JobSpecError, load_job
from pipeline.results import JOB_FILE, sweep_spec

app = typer.Typer(help="Sweep SDT + LoRA fine-tuning of Mamba, Mamba-2 and Jamba models.", no_args_is_help=True)

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a spec field: --set training.lr=1e-3")]
AddressOption = Annotated[
    str | None, typer.Option("--address", envvar="RAY_ADDRESS", help="An existing Ray cluster (default: start one)")
]


def load_or_exit(job: Path, overrides: list[str] | None) -> JobSpec:
    """The validated spec, with relative paths made absolute (Ray workers run elsewhere); bad input: exit 2."""
    from pipeline.models import check_method_fits

    try:
        spec = load_job(job, overrides or [])
        check_method_fits(spec)
    except JobSpecError as error:
        typer.echo(f"{job}: {error}", err=True)
        raise typer.Exit(2) from None
    return spec.with_absolute_paths()


def start_ray(address: str | None) -> None:
    import ray

    # Ray's usage reporting would try the network; none is reachable on a closed cluster.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, log_to_driver=True)


def prepare_builtin_base(spec: JobSpec) -> None:
    """Pretrain the built-in base once, here, rather than in every Ray worker at the same time."""
    if spec.model.builtin == "digits":
        from pipeline.digits import ensure_digits_base

        ensure_digits_base(log=typer.echo)


@app.command("version")
def show_version() -> None:
    """Print the installed sdtune version."""
    typer.echo(__version__)


@app.command()
def validate(job: Path, overrides: SetOption = None) -> None:
    """Check a job spec without starting anything."""
    spec = load_or_exit(job, overrides)
    typer.echo(f"{job}: valid ({spec.method.name} on {spec.data.task}, sweep dir {spec.sweep_dir})")


@app.command()
def pretrain(cache_dir: Annotated[Path | None, typer.Option(help="Default: $SDTUNE_CACHE or ~/.cache/sdtune")] = None) -> None:
    """Pretrain (once; cached) the tiny base model that the built-in digits task fine-tunes."""
    from pipeline.digits import ensure_digits_base

    typer.echo(f"digits base: {ensure_digits_base(cache_dir, log=typer.echo)}")


@app.command()
def train(job: Path, overrides: SetOption = None, address: AddressOption = None) -> None:
    """Run one trial (no Tune) through Ray Train, for debugging; rerun it to resume from its last checkpoint."""
    spec = load_or_exit(job, overrides)
    prepare_builtin_base(spec)
    start_ray(address)
    from pipeline.train import build_trainer

    result = build_trainer(spec, name="train").fit()
    for key, value in sorted((result.metrics or {}).items()):
        typer.echo(f"{key}: {value}")
    typer.echo(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")



@app.command()
def sweep(job: Path, overrides: SetOption = None, address: AddressOption = None) -> None:
    """Run the sweep of a job spec (Ray Tune trials, each a Ray Train worker group; MLflow tracks it), then export
    the best trial's adapter and write the report."""
    spec = load_or_exit(job, overrides)
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    (spec.sweep_dir / JOB_FILE).write_text(spec.to_yaml())
    run_and_finish(spec, address)


@app.command()
def resume(run_dir: Path, address: AddressOption = None) -> None:
    """Continue an interrupted sweep (finished trials are not run again), then export and report."""
    run_and_finish(spec_of_run(run_dir), address)


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
    from pipeline.export import export_trials
    from pipeline.results import load_trials
    from pipeline.tracking import SweepTracker

    export_trials(spec, load_trials(spec), SweepTracker(spec), out=out, merge=merge, log=typer.echo)


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
        typer.echo("give a sweep directory (runs/<job name>) or set MLFLOW_TRACKING_URI", err=True)
        raise typer.Exit(2)
    typer.echo(f"MLflow UI on http://{host}:{port}", err=True)
    command = [sys.executable, "-m", "mlflow", "server", *store, "--host", host, "--port", str(port)]
    os.execv(sys.executable, command)


def spec_of_run(run_dir: Path) -> JobSpec:
    """The spec a sweep was started with (``RUN_DIR/job.yaml``); no such sweep: exit 2."""
    if not (run_dir / JOB_FILE).is_file():
        typer.echo(f"{run_dir}: not a sweep directory (no job.yaml); give runs/<job name>", err=True)
        raise typer.Exit(2)
    try:
        return sweep_spec(run_dir)
    except JobSpecError as error:
        typer.echo(f"{run_dir / JOB_FILE}: {error}", err=True)
        raise typer.Exit(2) from None


def run_and_finish(spec: JobSpec, address: str | None) -> None:
    prepare_builtin_base(spec)
    start_ray(address)
    from pipeline.export import export_trials
    from pipeline.report import write_report
    from pipeline.tracking import SweepTracker
    from pipeline.tune import run_sweep

    tracker = SweepTracker(spec)
    outcome = run_sweep(spec, tracker)
    typer.echo(f"trials: {len(outcome.trials)} ({outcome.num_errors} failed)")
    export_trials(spec, outcome.trials, tracker, log=typer.echo)
    write_report(spec, outcome.trials, tracker, log=typer.echo)


if __name__ == "__main__":
    app()
