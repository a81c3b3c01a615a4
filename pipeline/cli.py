"""The ``sdtune`` command."""

from importlib.metadata import version

import typer

app = typer.Typer(help="Sweep SDT + LoRA fine-tuning of Mamba, Mamba-2 and Jamba models.", no_args_is_help=True)


@app.command("version")
def show_version() -> None:
    """Print the installed sdtune version."""
    typer.echo(version("sdtune"))
