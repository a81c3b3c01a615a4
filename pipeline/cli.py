"""The ``sdtune`` command."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import JobSpec, JobSpecError, load_job

app = typer.Typer(help="Sweep SDT + LoRA fine-tuning of Mamba, Mamba-2 and Jamba models.", no_args_is_help=True)

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a spec field: --set training.lr=1e-3")]
AddressOption = Annotated[
    str | None, typer.Option("--address", envvar="RAY_ADDRESS", help="An existing Ray cluster (default: start one)")
]


def load_or_exit(job: Path, overrides: list[str] | None) -> JobSpec:
    """The validated spec, with relative paths made absolute (Ray workers run elsewhere); bad input: exit 2."""
    try:
        spec = load_job(job, overrides or [])
    except JobSpecError as error:
        typer.echo(f"{job}: {error}", err=True)
        raise typer.Exit(2) from None
    changes = {"output_dir": str(Path(spec.output_dir).resolve())}
    if spec.data.data_files:
        changes["data.data_files"] = {k: str(Path(v).resolve()) for k, v in spec.data.data_files.items()}
    if spec.model.name_or_path and Path(spec.model.name_or_path).exists():
        changes["model.name_or_path"] = str(Path(spec.model.name_or_path).resolve())
    return spec.with_overrides(changes)


def start_ray(address: str | None) -> None:
    import ray

    # Ray's usage reporting would try the network; none is reachable on a closed cluster.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, log_to_driver=True)


def prepare_builtin_base(spec: JobSpec) -> None:
    """Pretrain the built-in base once, here, rather than in every Ray worker at the same time."""
    if spec.model.builtin == "digits":
        from pipeline.pretrain import ensure_digits_base

        ensure_digits_base(log=typer.echo)


@app.command("version")
def show_version() -> None:
    """Print the installed sdtune version."""
    typer.echo(version("sdtune"))


@app.command()
def validate(job: Path, overrides: SetOption = None) -> None:
    """Check a job spec without starting anything."""
    spec = load_or_exit(job, overrides)
    typer.echo(f"{job}: valid ({spec.method.name} on {spec.data.task}, sweep dir {spec.sweep_dir})")


@app.command()
def pretrain(cache_dir: Annotated[Path | None, typer.Option(help="Default: $SDTUNE_CACHE or ~/.cache/sdtune")] = None) -> None:
    """Pretrain (once; cached) the tiny base model that the built-in digits task fine-tunes."""
    from pipeline.pretrain import ensure_digits_base

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
    """Run the sweep of a job spec: Ray Tune trials, each a Ray Train worker group; MLflow tracks it."""
    spec = load_or_exit(job, overrides)
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    (spec.sweep_dir / "job.yaml").write_text(spec.to_yaml())
    run_and_print(spec, address)


@app.command()
def resume(run_dir: Path, address: AddressOption = None) -> None:
    """Continue an interrupted sweep; finished trials are not run again."""
    from pipeline.tune import sweep_dir_spec

    run_and_print(sweep_dir_spec(run_dir), address)


def run_and_print(spec: JobSpec, address: str | None) -> None:
    prepare_builtin_base(spec)
    start_ray(address)
    from pipeline.tune import run_sweep

    results = run_sweep(spec)
    best = results.get_best_result()
    typer.echo(f"trials: {len(results)} ({results.num_errors} failed)")
    typer.echo(f"best trial: {best.path}")
    for key in sorted(k for k in best.metrics if k.startswith(("eval/", "train/")) or k in ("step", "checkpoint_path")):
        typer.echo(f"{key}: {best.metrics[key]}")


if __name__ == "__main__":
    app()
