"""What the benches that repeat a measurement share: running a command as a user does and timing it, the spread of
a figure over rounds (median, quartiles, range), and writing the rounds to a JSON file.

Imported by bench/trial_speed.py, bench/early_stopping.py and bench/generation_speed.py, which Python runs with
bench/ first on its path.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SDTUNE = [sys.executable, "-m", "pipeline.cli.commands"]  # the `sdtune` command of this checkout
# What every trial's worker imports: importing it once before the first timed run loads these files into the page
# cache, so that the first run of a bench is not the only one that reads them from disk.
WORKER_IMPORTS = "import pipeline.trial.worker, pipeline.cli.commands"


def warm_up_imports() -> None:
    subprocess.run([sys.executable, "-c", WORKER_IMPORTS], check=True)


def device_name() -> str:
    """The GPU this machine's torch sees ("cpu" without one), asked in a process of its own: a bench that only
    launches commands keeps no CUDA context of its own beside theirs."""
    probe = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    return subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.strip()


def timed_command(command: Sequence[str], what: str) -> tuple[float, str]:
    """Runs ``command`` to its end; returns (its wall time in seconds, from launch to exit, and its standard output).
    A command that fails ends the bench with its output shown."""
    began = time.perf_counter()
    done = subprocess.run(list(command), capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-20_000:] + done.stderr[-20_000:])
        raise SystemExit(f"{what} failed (exit {done.returncode}): {' '.join(command)}")
    return wall, done.stdout


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Median, quartiles (inclusive method: the quartiles of the values themselves) and range of ``values``."""
    values = sorted(values)
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "n": len(values),
        "median": statistics.median(values),
        "q1": quartiles[0],
        "q3": quartiles[2],
        "min": values[0],
        "max": values[-1],
    }


def quartile_text(figure: dict[str, float | int], unit: str = "", digits: int = 3) -> str:
    """``median (quartiles q1-q3, range min-max, n rounds)``."""
    f = lambda value: f"{value:,.{digits}f}{unit}"  # noqa: E731
    return (
        f"median {f(figure['median'])} (quartiles {f(figure['q1'])}-{f(figure['q3'])}, "
        f"range {f(figure['min'])}-{f(figure['max'])}, {plural(figure['n'], 'round')})"
    )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def header(bench: str) -> dict[str, Any]:
    """What every bench's JSON begins with: which bench, when, on what, and the command line."""
    return {
        "bench": bench,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).as_posix(), *sys.argv[1:]],
        "host_cpus": os.cpu_count(),
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same directory, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
        json.dump(data, file, indent=2)
        file.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file.name, 0o666 & ~umask)  # as open() would have made it, not a temporary file's 0600
    os.replace(file.name, path)
