"""Where a sweep's files live: a local directory or a directory in object storage, and what differs between them.

``output_dir`` (and so the sweep directory, Ray's ``storage_path``) is a local path or an object-store URI such as
``s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000&region=us-east-1``: any URI that
:meth:`pyarrow.fs.FileSystem.from_uri` opens, which is what Ray Train and Tune accept. Credentials come from the
environment (``AWS_ACCESS_KEY_ID`` ...) or the machine's role, never from the URI, which is written into
``job.yaml``, Ray's state and MLflow. :func:`storage_path` gives a :class:`pathlib.Path` for a local directory and
an :class:`ObjectPath` for a URI; ``ObjectPath`` has the part of pathlib's API that sdtune uses on a sweep
directory (``/``, ``name``, ``parent``, ``exists``, ``is_file``, ``is_dir``, ``read_text``, ``write_text``, ...),
so code that reads and writes single files takes either. The rest is said here:

- :func:`write_directory`: a directory written whole. Object storage cannot rename, so instead of a staging
  folder renamed into place, the files go up one by one and a *marker* file last (readers take a directory
  without its marker for one not written yet), and a replacement goes up whole beside the directory it replaces
  before that one is deleted.
- :func:`local_copy`: a directory to read with code that wants a local path (``sdt.load``).
- :func:`reported_path`: a path as Ray reports it (checkpoints in object storage come without their scheme), and
  :func:`sibling_directories`: the checkpoints Ray kept beside one, in whichever filesystem Ray gives.
- :func:`local_state_dir`: what cannot live in object storage (the sweep's lock, ``driver-error.log``, the
  default MLflow store) lives on this machine, under ``$SDTUNE_STATE`` (default ``~/.local/state/sdtune``).
- :func:`claim_directory`: one sdtune command per sweep directory (per machine, for a sweep in object storage).

Also the local helpers that several processes share: an advisory file lock and a content hash naming cached results.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow.fs

STATE_ENV = "SDTUNE_STATE"  # this machine's side of sweeps kept in object storage
LOCK_FILE = ".sdtune.lock"  # in a sweep's local state: held by the one command working on it
INCOMPLETE_MARKER = ".sdtune-incomplete"  # in an object-store directory that write_directory began and did not end
SECRET_OPTIONS = ("access_key", "secret_key", "session_token")  # URI options pyarrow takes that are credentials
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on the local file ``path`` (created if missing), held for the ``with`` block. The
    OS releases it when the holder dies, so a crashed process never blocks the next one."""
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


@cache
def _filesystem(scheme: str, root: str, options: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem of ``scheme://root?options`` and the path it gives that root, once per process."""
    return pyarrow.fs.FileSystem.from_uri(f"{scheme}://{root}" + (f"?{options}" if options else ""))


@dataclass(frozen=True)
class ObjectPath:
    """A file or directory in object storage, ``scheme://root/key?options`` (root: the bucket); pickles as its URI."""

    scheme: str
    root: str
    key: str  # "/"-separated, without a leading or trailing "/"; "" for the root itself
    options: str  # the URI's query: endpoint_override, region, ...

    @classmethod
    def parse(cls, uri: str) -> ObjectPath:
        parts = urlsplit(uri)
        return cls(parts.scheme, parts.netloc, parts.path.strip("/"), parts.query)

    def __str__(self) -> str:
        return self.as_uri() + (f"?{self.options}" if self.options else "")

    def __truediv__(self, name: str) -> ObjectPath:
        return replace(self, key=posixpath.join(self.key, str(name)).strip("/"))

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def parent(self) -> ObjectPath:
        return replace(self, key=posixpath.dirname(self.key))

    def resolve(self) -> ObjectPath:
        """Itself: a URI is absolute."""
        return self

    def as_uri(self) -> str:
        """The URI without its options, as other tools name the place (MLflow's artifact location, whose S3 endpoint
        is ``MLFLOW_S3_ENDPOINT_URL``)."""
        return f"{self.scheme}://{self.root}" + (f"/{self.key}" if self.key else "")

    def filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """The pyarrow filesystem this path is in, and the path it has there (no scheme, no options)."""
        filesystem, root_path = _filesystem(self.scheme, self.root, self.options)
        return filesystem, posixpath.join(root_path, self.key).rstrip("/")

    def at(self, fs_path: str) -> ObjectPath:
        """The path called ``fs_path`` in this one's filesystem (Ray reports checkpoints in object storage so)."""
        _, root_path = _filesystem(self.scheme, self.root, self.options)
        if fs_path != root_path and not fs_path.startswith(f"{root_path}/"):
            raise ValueError(f"{fs_path} is not in {self.scheme}://{self.root}")
        return replace(self, key=fs_path[len(root_path) :].strip("/"))

    def _type(self) -> pyarrow.fs.FileType:
        filesystem, path = self.filesystem()
        return filesystem.get_file_info(path).type

    def exists(self) -> bool:
        return self._type() != pyarrow.fs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pyarrow.fs.FileType.File

    def is_dir(self) -> bool:
        """Whether any file is under this path (object storage has no empty folders)."""
        return self._type() == pyarrow.fs.FileType.Directory

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to make: a folder in object storage exists once a file is in it."""

    def read_bytes(self) -> bytes:
        filesystem, path = self.filesystem()
        with filesystem.open_input_stream(path) as stream:
            return stream.readall()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """One object, whole: it appears when the upload completes (the data is in memory before it starts)."""
        filesystem, path = self.filesystem()
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def unlink(self, missing_ok: bool = False) -> None:
        filesystem, path = self.filesystem()
        try:
            filesystem.delete_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise


StoragePath = Path | ObjectPath


def storage_path(location: str | os.PathLike) -> StoragePath:
    """A local path (also from a ``file://`` URI) or an :class:`ObjectPath` (any other URI)."""
    if isinstance(location, Path | ObjectPath):
        return location
    text = os.fspath(location)
    if not _URI.match(text):
        return Path(text)
    if urlsplit(text).scheme == "file":
        return Path(unquote(urlsplit(text).path))
    return ObjectPath.parse(text)


def secret_options(location: str) -> list[str]:
    """The credentials that a storage URI carries in its options (they belong in the environment)."""
    return [option for option in parse_qs(urlsplit(location).query) if option in SECRET_OPTIONS]


def check_reachable(directory: ObjectPath) -> None:
    """Raise OSError unless the bucket (the root) of ``directory`` answers; ValueError for a URI pyarrow rejects."""
    root = replace(directory, key="")
    if not root.is_dir():
        raise OSError(f"no bucket {root.scheme}://{root.root} at this endpoint (create it first)")


def reported_path(sweep_dir: StoragePath, reported: str) -> StoragePath:
    """A path as Ray reports it (a checkpoint's ``checkpoint_path``) for a sweep in ``sweep_dir``: a local path or a
    ``file://`` URI for a local sweep, a path without scheme in the sweep's filesystem for one in object storage."""
    if isinstance(sweep_dir, ObjectPath):
        return sweep_dir.at(reported)
    return Path(reported.removeprefix("file://"))


@contextmanager
def local_copy(directory: StoragePath) -> Iterator[Path]:
    """``directory`` as a local directory for the ``with`` block: itself, or a temporary download of it."""
    if isinstance(directory, Path):
        yield directory
        return
    filesystem, path = directory.filesystem()
    with tempfile.TemporaryDirectory() as download:
        pyarrow.fs.copy_files(path, download, source_filesystem=filesystem)
        yield Path(download)


def write_directory(target: StoragePath, write: Callable[[Path], None], marker: str) -> StoragePath:
    """``write(folder)`` fills a local folder (``marker``, a file it must create, included) that then replaces
    ``target`` whole. At every moment one complete directory, the previous or the new, is in storage.

    Locally the folder is a staging sibling renamed into place (:func:`sdt.write_atomically`). Object storage has no
    rename, so readers take a directory without ``marker`` for one not written, and
    :func:`is_written_by_sdtune` knows it by the :data:`INCOMPLETE_MARKER` it carries while files go up (``marker``
    last). Replacing a directory, the new one first goes up whole beside it (``.<name>.<random>``): a failure then
    leaves the previous one as it was, and one after the previous is deleted leaves the new one there, whole. The new
    one then goes up again from the local folder, not as copies inside the store: an S3 copy is one request, of at
    most 5 GB, and a merged model's weights can be larger.
    """
    if isinstance(target, Path):
        import sdt  # here: the sdt package imports torch, which this module's other users need not

        return sdt.write_atomically(target, write)
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(staging)
        write(folder)
        if not (folder / marker).is_file():
            raise FileNotFoundError(f"the directory written for {target} has no {marker}")
        beside = target.parent / f".{target.name}.{uuid.uuid4().hex}" if target.is_dir() else None
        if beside is not None:
            try:
                _upload(folder, beside, marker)
            except BaseException:
                _delete(beside)
                raise
        (target / INCOMPLETE_MARKER).write_bytes(b"")
        (target / marker).unlink(missing_ok=True)
        _clear(target, keep=INCOMPLETE_MARKER)
        _upload(folder, target, marker)
    (target / INCOMPLETE_MARKER).unlink()
    if beside is not None:
        _delete(beside)
    return target


def _upload(folder: Path, directory: ObjectPath, marker: str) -> None:
    """The files of the local ``folder`` into ``directory``, ``marker`` last."""
    filesystem, path = directory.filesystem()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != marker):
        pyarrow.fs.copy_files(
            str(file), f"{path}/{file.relative_to(folder).as_posix()}", destination_filesystem=filesystem
        )
    pyarrow.fs.copy_files(str(folder / marker), f"{path}/{marker}", destination_filesystem=filesystem)


def _clear(directory: ObjectPath, keep: str) -> None:
    """Delete everything under ``directory`` but its file ``keep``."""
    filesystem, path = directory.filesystem()
    for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)):
        if entry.base_name == keep:
            continue
        if entry.type == pyarrow.fs.FileType.Directory:
            filesystem.delete_dir(entry.path)
        else:
            filesystem.delete_file(entry.path)


def _delete(directory: ObjectPath) -> None:
    """Delete ``directory`` and everything under it, if it exists."""
    filesystem, path = directory.filesystem()
    if directory.exists():
        filesystem.delete_dir(path)


def sibling_directories(filesystem: pyarrow.fs.FileSystem, path: str, prefix: str) -> list[str]:
    """The paths of the other directories beside ``path`` in ``filesystem`` whose names begin with ``prefix``."""
    path = path.rstrip("/")
    siblings = filesystem.get_file_info(pyarrow.fs.FileSelector(posixpath.dirname(path)))
    return [
        entry.path for entry in siblings
        if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith(prefix) and entry.path != path
    ]  # fmt: skip


def subdirectories(directory: StoragePath, prefix: str) -> list[StoragePath]:
    """The directories in ``directory`` whose names begin with ``prefix``, in name order; none where ``directory``
    does not exist."""
    if isinstance(directory, Path):
        return sorted(path for path in directory.glob(f"{prefix}*") if path.is_dir())
    filesystem, path = directory.filesystem()
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    found = [entry for entry in entries if entry.type == pyarrow.fs.FileType.Directory]
    return [
        directory / entry.base_name
        for entry in sorted(found, key=lambda e: e.base_name)
        if entry.base_name.startswith(prefix)
    ]


def is_written_by_sdtune(directory: StoragePath, marker: str) -> bool:
    """Whether ``directory`` is one that :func:`write_directory` wrote (``marker``) or began writing."""
    return (directory / marker).is_file() or (directory / INCOMPLETE_MARKER).is_file()


def write_file(path: StoragePath, text: str) -> None:
    """``text`` as the file ``path``, whole or not at all: locally a temporary sibling renamed over it, in object
    storage one object."""
    if isinstance(path, ObjectPath):
        path.write_text(text)
        return
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


def state_root() -> Path:
    """``$SDTUNE_STATE``, else ``~/.local/state/sdtune``: this machine's side of sweeps kept in object storage."""
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".local" / "state" / "sdtune")


def local_state_dir(sweep_dir: StoragePath) -> Path:
    """Where this machine keeps what a sweep cannot keep in object storage (its lock, ``driver-error.log``, the
    default MLflow store): the sweep directory itself when it is local, else ``<state root>/sweeps/<name>-<hash of
    the URI>``. Not created here."""
    if isinstance(sweep_dir, Path):
        return sweep_dir
    return state_root() / "sweeps" / f"{sweep_dir.name}-{content_hash(str(sweep_dir), 12)}"


class DirectoryBusy(RuntimeError):
    """Another process holds the directory (its pid in the message)."""


@contextmanager
def claim_directory(directory: StoragePath) -> Iterator[None]:
    """Hold the sweep ``directory`` for this process, or raise :class:`DirectoryBusy` at once if another one does.
    An advisory lock in its :func:`local_state_dir`, released by the OS when its holder dies, so a crashed sweep
    never blocks its resume. For a sweep in object storage the lock is on this machine: it does not stop a command
    on another machine."""
    state = local_state_dir(directory)
    state.mkdir(parents=True, exist_ok=True)
    with open(state / LOCK_FILE, "a+") as handle:
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


def normal_file_modes(directory: Path) -> None:
    """Files readable as any other file the user writes: 0666 less the umask (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_numpy_scalar) + "\n")


def _numpy_scalar(value: Any) -> Any:
    # Ray Tune samples randint / choice values as numpy scalars, which json cannot write.
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
