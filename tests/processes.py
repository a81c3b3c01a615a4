"""The sdtune command in a subprocess, as a person runs it, and real faults for the tests that need them: wait for a
sweep's state in its storage, then kill a driver or a worker.

No product code knows about these: the tests kill processes from outside, as a crash or an operator would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow.fs

POLL_S = 0.1  # how often a condition on files or processes is looked at again (an event wait, not a delay)


def plugin_env(digits_cache: Path, plugins: Path) -> dict[str, str]:
    """The environment of ``sdtune`` run on a spec whose ``imports`` are modules in ``plugins``: the command and
    every Ray process it starts import them from there."""
    path = os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled", "PYTHONPATH": path}


def sdtune(*args: str, env: dict, **extra_env: str) -> subprocess.CompletedProcess:
    """``sdtune ARGS`` run to its end, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli.commands", *args],
        env={**env, **extra_env},
        capture_output=True,
        text=True,
        timeout=1200,
    )


def failure(result: subprocess.CompletedProcess) -> str:
    """The end of what a failed command printed."""
    return result.stdout[-3000:] + result.stderr[-6000:]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = POLL_S):
    """``condition()``'s first truthy value, looked at every ``every`` seconds; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def finished_trials(tune_dir: str | Path) -> int:
    """How many trials Ray Tune's experiment state records as finished (TERMINATED), read where Ray keeps it: an
    absolute local path, or an object-store URI (where the driver uploads it in the background)."""
    filesystem, path = pyarrow.fs.FileSystem.from_uri(str(tune_dir))
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        latest = max(
            e.path for e in entries if e.base_name.startswith("experiment_state-") and e.path.endswith(".json")
        )
        with filesystem.open_input_stream(latest) as stream:
            state = json.loads(stream.readall())
    except (ValueError, OSError):  # none yet, or caught mid-write
        return 0
    return sum(json.loads(trial)["status"] == "TERMINATED" for trial, _ in state["trial_data"])


def train_workers(driver_pid: int) -> list[psutil.Process]:
    """The Ray Train worker processes started by the Ray instance of the driver ``driver_pid``."""
    workers = []
    for process in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.NoSuchProcess:
            pass
    return workers
