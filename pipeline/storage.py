"""Files that several processes share: an advisory lock, a content hash that names cached results, and the
conversion of the ``file://`` URIs Ray reports into paths."""

from __future__ import annotations

import fcntl
import hashlib
import json
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
