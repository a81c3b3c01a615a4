"""Files that several processes share: an advisory lock, a content hash that names cached results, and the
conversion of the ``file://`` URIs Ray reports into paths."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing), held for the ``with`` block. The OS releases
    it when the holder dies, so a crashed process never blocks the next one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def content_hash(value: Any, length: int = 16) -> str:
    """A short, stable name for a JSON-serialisable value (key order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def local_path(uri: str | Path) -> Path:
    """A local path from a path or a ``file://`` URI, as Ray reports checkpoint locations."""
    return Path(str(uri).removeprefix("file://"))


LOCK_FILE = ".sdtune.lock"  # in a sweep directory: held by the one command working on it


class DirectoryBusy(RuntimeError):
    """Another process holds the directory (its pid in the message)."""


@contextmanager
def claim_directory(directory: Path) -> Iterator[None]:
    """Hold ``directory`` for this process, or raise :class:`DirectoryBusy` at once if another one does. An
    advisory lock released by the OS when its holder dies, so a crashed sweep never blocks its resume."""
    path = Path(directory) / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise DirectoryBusy(f"another sdtune command (pid {holder}) is working on it; wait for it to end") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
