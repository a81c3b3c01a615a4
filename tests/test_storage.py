"""A sweep directory on local disk or in object storage (a real S3 server, moto, on 127.0.0.1), without Ray: paths,
directories written whole (renamed into place locally, marker last in object storage), what stays on this machine,
and the checks that refuse an unusable output_dir before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.fs
import pytest
import yaml
from processes import wait_for
from typer.testing import CliRunner

from pipeline.cli.commands import app
from pipeline.spec.job import JobSpecError, parse_job
from pipeline.storage.paths import (
    INCOMPLETE_MARKER,
    LOCK_FILE,
    STATE_ENV,
    DirectoryBusy,
    ObjectPath,
    claim_directory,
    is_written_by_sdtune,
    local_copy,
    local_state_dir,
    reported_path,
    storage_path,
    subdirectories,
    write_directory,
)

MARKER = "done.json"


@pytest.fixture(params=["local", "s3"])
def directory(request, tmp_path):
    """An empty directory on local disk, or under a fresh prefix of the S3 bucket."""
    if request.param == "local":
        return tmp_path / "dir"
    return storage_path(request.getfixturevalue("s3_bucket")) / request.node.name.replace("[", "-").rstrip("]")


def files(directory) -> dict[str, bytes]:
    with local_copy(directory) as local:
        return {p.relative_to(local).as_posix(): p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file()}


def copies_beside(directory: ObjectPath) -> list[ObjectPath]:
    """The directories beside ``directory`` in object storage that a replacement of it uploaded first."""
    filesystem, parent = directory.parent.filesystem()
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    return [directory.parent / e.base_name for e in entries if e.base_name.startswith(f".{directory.name}.")]


def test_a_location_is_a_local_path_or_an_object_path(s3_bucket):
    assert storage_path("runs") == Path("runs") and storage_path("file:///tmp/runs") == Path("/tmp/runs")
    sweep = storage_path(s3_bucket) / "runs" / "quickstart"
    assert isinstance(sweep, ObjectPath) and sweep.name == "quickstart" and sweep.parent.name == "runs"
    assert str(sweep) == s3_bucket.replace("?", "/runs/quickstart?") and storage_path(str(sweep)) == sweep
    # Ray reports a checkpoint in object storage as a path in its filesystem, without scheme or options
    checkpoint = reported_path(sweep, "sdtune/runs/quickstart/trial-1/checkpoint_000")
    assert checkpoint == sweep / "trial-1" / "checkpoint_000"
    assert reported_path(Path("/r/q"), "file:///r/q/trial-1/checkpoint_000") == Path("/r/q/trial-1/checkpoint_000")


def test_a_directory_is_written_whole_and_replaced_whole(directory):
    def first(folder: Path) -> None:
        (folder / "merged").mkdir()
        (folder / "merged" / "model.safetensors").write_bytes(b"weights")
        (folder / MARKER).write_text("1")

    def second(folder: Path) -> None:
        (folder / "adapter.safetensors").write_bytes(b"adapter")
        (folder / MARKER).write_text("2")

    write_directory(directory, first, marker=MARKER)
    assert files(directory) == {"merged/model.safetensors": b"weights", MARKER: b"1"}
    write_directory(directory, second, marker=MARKER)
    assert files(directory) == {"adapter.safetensors": b"adapter", MARKER: b"2"}  # nothing of the first is left
    assert not (directory / "merged").is_dir()
    if isinstance(directory, ObjectPath):
        assert not copies_beside(directory)  # the copy uploaded beside it first is gone

    def failing(folder: Path) -> None:
        (folder / MARKER).write_text("3")
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError):
        write_directory(directory, failing, marker=MARKER)
    assert files(directory) == {"adapter.safetensors": b"adapter", MARKER: b"2"}  # staged, never uploaded


REPLACE = """
import sys
from pipeline.storage.paths import storage_path, write_directory

def new(folder):
    for part in range(16):
        (folder / f"part-{part:02}.bin").write_bytes(bytes([part]) * 2**20)
    (folder / sys.argv[2]).write_text("new")

write_directory(storage_path(sys.argv[1]), new, marker=sys.argv[2])
"""


def put(path, text: str) -> None:
    """A file, its folders made first where the path is local (object storage has no folders to make)."""
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_directorys_subdirectories_are_listed_by_name_with_a_prefix(directory):
    """How a resumed sweep finds a trial's checkpoints (checkpoint_<time>/), wherever the sweep is."""
    assert subdirectories(directory, "checkpoint_") == []  # none yet: the trial never saved one
    for name in ("checkpoint_2", "checkpoint_1", "other_1"):
        put(directory / name / "trainer_state.json", "{}")
    put(directory / "checkpoint_file", "a file, not a directory")
    found = subdirectories(directory, "checkpoint_")
    assert found == [directory / "checkpoint_1", directory / "checkpoint_2"]
    assert all(path.is_dir() for path in found)


def test_a_replacement_killed_while_the_old_directory_makes_way_leaves_the_new_one_whole(s3_bucket):
    """Object storage cannot rename: a process killed (SIGKILL, no cleanup) while it deletes the directory it
    replaces and uploads the new one in its place still leaves a whole directory, the new one, in storage."""
    directory = storage_path(s3_bucket) / "replaced"
    write_directory(directory, lambda folder: (folder / MARKER).write_text("old"), marker=MARKER)
    new = {f"part-{part:02}.bin": bytes([part]) * 2**20 for part in range(16)} | {MARKER: b"new"}
    writer = subprocess.Popen([sys.executable, "-c", REPLACE, str(directory), MARKER])
    try:
        wait_for(lambda: writer.poll() is not None or (directory / INCOMPLETE_MARKER).exists(), 120,
                 "the old directory to make way")  # fmt: skip
    finally:
        writer.kill()
        writer.wait()
    assert new in [files(d) for d in [directory, *copies_beside(directory)] if (d / MARKER).is_file()]


def test_an_upload_cut_short_is_known_for_sdtunes_and_written_over(s3_bucket):
    """An upload that stopped midway (the process died) left its incomplete marker and part of the files: sdtune
    knows the directory for its own (an export there is replaced, not refused) and the next write leaves no trace."""
    directory = storage_path(s3_bucket) / "cut-short"
    (directory / INCOMPLETE_MARKER).write_bytes(b"")
    (directory / "merged" / "model.safetensors").write_bytes(b"wei")
    assert is_written_by_sdtune(directory, MARKER) and not (directory / MARKER).exists()
    write_directory(directory, lambda folder: (folder / MARKER).write_text("whole"), marker=MARKER)
    assert files(directory) == {MARKER: b"whole"}
    foreign = storage_path(s3_bucket) / "foreign"
    (foreign / "notes.txt").write_text("a user's")
    assert not is_written_by_sdtune(foreign, MARKER)


def test_a_sweep_in_object_storage_keeps_its_lock_on_this_machine(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "state"))
    sweep = storage_path(s3_bucket) / "locked"
    state = local_state_dir(sweep)
    assert state.parent == tmp_path / "state" / "sweeps" and state.name.startswith("locked-")
    with claim_directory(sweep):
        assert (state / LOCK_FILE).is_file()
        with pytest.raises(DirectoryBusy), claim_directory(storage_path(str(sweep))):
            pass
    assert not sweep.exists()  # nothing of it in the bucket
    assert local_state_dir(storage_path(s3_bucket.replace("region=us-east-1", "region=eu-west-1")) / "locked") != state


def test_credentials_in_the_output_uri_are_refused():
    with pytest.raises(JobSpecError) as refused:
        parse_job({"name": "n", "model": {"builtin": "digits"}, "output_dir": "s3://b/p?secret_key=abc&region=x"})
    assert refused.value.where == "output_dir" and "secret_key" in str(refused.value)


def test_an_output_dir_in_a_missing_bucket_is_refused_before_anything_starts(s3_bucket, tmp_path):
    job = tmp_path / "job.yaml"
    missing = s3_bucket.replace("s3://sdtune", "s3://no-such-bucket")
    job.write_text(yaml.safe_dump({"name": "n", "model": {"builtin": "digits"}, "output_dir": missing}))
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 2
    assert result.output.startswith(f"{job}: output_dir: cannot use {missing}: no bucket s3://no-such-bucket")
    job.write_text(yaml.safe_dump({"name": "n", "model": {"builtin": "digits"}, "output_dir": s3_bucket}))
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code == 0 and f"sweep dir {s3_bucket.replace('?', '/n?')}" in result.output
