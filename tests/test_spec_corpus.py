"""A corpus of malformed job specs: each fails validation with one line naming the field (or the file), before
anything starts or is written, in about a second.

The whole corpus runs in-process through the validation entry point (``pipeline.cli.preflight.load_checked``); a
sample runs through ``sdtune validate`` and ``sdtune sweep`` (exit 2, no sweep directory, no MLflow store, no
Ray).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner

from pipeline.cli.commands import app
from pipeline.cli.preflight import load_checked
from pipeline.spec.job import JobSpecError

GOOD = {"name": "ok", "model": {"builtin": "digits"}, "data": {"task": "digits"}, "resources": {"cpus_per_worker": 0.5}}
TINY_MAMBA = {"hidden_size": 16, "num_hidden_layers": 2, "state_size": 4}


def with_(section: str, **values) -> dict:
    return {**GOOD, section: {**GOOD.get(section, {}), **values}}


def space(key: str, domain: dict, **search) -> dict:
    return {**GOOD, "search": {"space": {key: domain}, **search}}


# (the spec: a mapping, or raw text for the YAML-level cases; what the error line starts with)
CORPUS: list[tuple[object, str]] = [
    # the document
    ("name: a\nname: b\nmodel: {builtin: digits}\n", "job.yaml: invalid YAML: duplicate key 'name'"),
    (
        "name: ok\nmodel: {builtin: digits}\ntraining: {epochs: 3, epochs: 4}\n",
        "job.yaml: invalid YAML: duplicate key 'epochs'",
    ),
    ("name: ok\nmodel: [builtin\n", "job.yaml: invalid YAML"),
    ("- a\n- b\n", "job.yaml: the spec must be a mapping"),
    ("just words\n", "job.yaml: the spec must be a mapping"),
    (b"name: caf\xe9\nmodel: {builtin: digits}\n", "job.yaml: not a UTF-8 text file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "job.yaml: not a UTF-8 text file"),
    (
        "a: &a [x,x,x,x,x,x,x,x,x]\n"
        + "".join(f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
        "job.yaml: invalid YAML: the aliases expand",
    ),
    ("name: ok\nmodel: {builtin: digits}\n# " + "x" * (1 << 20) + "\n", "job.yaml: invalid YAML: the file is larger"),
    # names and places
    ({"model": {"builtin": "digits"}}, "name: Field required"),
    ({**GOOD, "name": "a/b"}, "name:"),
    ({**GOOD, "name": ".."}, "name:"),
    ({**GOOD, "name": "x" * 101}, "name:"),
    ({**GOOD, "output_dir": "FILE"}, "output_dir: "),
    ({**GOOD, "extra": 1}, "extra: Extra inputs are not permitted"),
    # the model
    ({**GOOD, "model": {}}, "model:"),
    ({**GOOD, "model": {"builtin": "digits", "architecture": "mamba"}}, "model:"),
    ({**GOOD, "model": {"builtin": "cifar"}}, "model.builtin:"),
    ({**GOOD, "model": {"architecture": "transformer"}}, "model.architecture:"),
    (
        {**GOOD, "model": {"architecture": "mamba", "config": {**TINY_MAMBA, "hidden_size": -4}}},
        "model.config: cannot build",
    ),
    ({**GOOD, "model": {"builtin": "digits", "config": {"hidden_size": 8}}}, "model.config:"),
    ({**GOOD, "model": {"name_or_path": "/nowhere/model"}}, "model.name_or_path: no such directory"),
    ({**GOOD, "model": {"name_or_path": "./missing-model"}}, "model.name_or_path: no such directory"),
    ({**GOOD, "model": {"builtin": "digits", "dtype": "float16"}}, "model.dtype:"),
    ({**GOOD, "model": {"builtin": "digits", "trust_remote_code": "yes"}}, "model.trust_remote_code:"),
    # the data
    (with_("data", task="imagenet"), "data.task:"),
    (with_("data", task="files"), "data.data_files:"),
    (with_("data", task="files", data_files={"train": "FILES/train.jsonl"}), "data.kind:"),
    (
        with_("data", task="files", kind="classification", data_files={"train": "/nowhere/train.jsonl"}),
        "data.data_files.train: no such file",
    ),
    (with_("data", task="files", kind="classification", data_files={"train": "FILES/train.txt"}), "data.data_files:"),
    (with_("data", task="files", kind="classification", data_files={"dev": "FILES/train.jsonl"}), "data.data_files:"),
    (with_("data", task="glue"), "data.dataset:"),
    (with_("data", columns={"question": "q"}), "data.columns:"),
    (with_("data", label_names=["yes", "yes"]), "data.label_names:"),
    (with_("data", validation_fraction=1.0), "data.validation_fraction:"),
    (with_("data", max_length=0), "data.max_length:"),
    (with_("data", max_length=1.5), "data.max_length:"),
    # the method
    (with_("method", name="adapter"), "method.name: 'adapter' is not one of"),
    (with_("method", lora_variant="vera"), "method.lora_variant: 'vera' is not one of"),
    (with_("method", lora_rank=0), "method.lora_rank:"),
    (with_("method", lora_rank=True), "method.lora_rank:"),
    (with_("method", lora_alpha=0), "method.lora_alpha:"),
    (with_("method", lora_targets=["q_proj"]), "method.lora_targets:"),
    (with_("method", sdt_targets=["D"]), "method.sdt_targets:"),
    (with_("method", channels_frozen=1.5), "method.channels_frozen:"),
    (with_("method", channels_frozen=-1), "method.channels_frozen:"),
    (with_("method", channels_frozen="most"), "method.channels_frozen:"),
    (with_("method", channels_frozen=1.0), "method.channels_frozen: 1.0 freezes all"),
    (with_("method", name="sdt", lora_targets=["out_proj"]), "method.lora_targets: method 'sdt' trains no LoRA"),
    (with_("method", name="lora", lora_targets=[]), "method.lora_targets: method 'lora' needs"),
    (with_("method", warmup_steps=0), "method.warmup_steps:"),
    # training
    (with_("training", epochs=0), "training.epochs:"),
    (with_("training", epochs=True), "training.epochs:"),
    (with_("training", epochs="3"), "training.epochs:"),
    (with_("training", lr=-1e-3), "training.lr:"),
    (with_("training", lr="fast"), "training.lr:"),
    (with_("training", lr=float("nan")), "training.lr:"),
    (with_("training", batch_size=2000), "training.batch_size: 2000 x 1 workers needs 2000 training examples"),
    (with_("training", offload_parameters=True), "training.offload_parameters: only ZeRO-3 partitions"),
    (with_("training", zero_stage=0, offload_optimizer=True), "training.offload_optimizer: needs ZeRO"),
    (with_("training", deepspeed=[1]), "training.deepspeed:"),
    (with_("training", max_failures=-1), "training.max_failures:"),
    (with_("training", zero_stage=4), "training.zero_stage:"),
    (with_("training", grad_clip=0), "training.grad_clip:"),
    # resources
    (with_("resources", num_workers=0), "resources.num_workers:"),
    (with_("resources", cpus_per_worker=64), "resources.cpus_per_worker: a trial needs"),
    (with_("resources", use_gpu=True), "resources.use_gpu: a trial needs"),
    (with_("resources", gpus_per_worker=1.5), "resources.gpus_per_worker:"),
    (with_("resources", num_workers=2, gpus_per_worker=0.5, use_gpu=True), "resources.gpus_per_worker:"),
    # the search
    (
        {**GOOD, "search": {"metric": "eval/bleu"}},
        "search.metric: 'eval/bleu' is not reported by a classification task",
    ),
    ({**GOOD, "search": {"metric": "test/accuracy"}}, "search.metric: test/accuracy: the test split never picks"),
    ({**GOOD, "search": {"mode": "maximize"}}, "search.mode:"),
    ({**GOOD, "search": {"scheduler": "pbt"}}, "search.scheduler:"),
    (space("training.lr", {"grid": []}), "search.space.training.lr:"),
    (space("training.lr", {"grid": [1e-3], "choice": [1e-2]}), "search.space.training.lr:"),
    (space("training.lr", {"uniform": [1e-2, 1e-3]}), "search.space.training.lr:"),
    (space("training.lr", {"loguniform": [0, 1e-3]}), "search.space.training.lr:"),
    (space("training.lr", {"grid": [1e-3, -1.0]}), "search.space.training.lr: value -1.0 fails"),
    (space("training.epochs", {"uniform": [1, 3]}), "search.space.training.epochs:"),
    (
        space("training.offload_parameters", {"grid": [False, True]}),
        "search.space.training.offload_parameters: value True fails",
    ),
    (space("resources.num_workers", {"grid": [1, 2]}), "search.space.resources.num_workers: not searchable"),
    (space("training.nope", {"grid": [1]}), "search.space.training.nope: no such field"),
    (space("method.channels_frozen", {"grid": [0.5, 1.0]}), "search.space.method.channels_frozen: value 1.0 fails"),
    (space("method.name", {"grid": ["sdlora", "qlora"]}), "search.space.method.name: value 'qlora' fails"),
    (space("training.lr", {"choice": [1e-3]}, algorithm="bayes"), "search.algorithm:"),
    # tracking and export
    (
        {**GOOD, "tracking": {"uri": "http://127.0.0.1:9"}},
        "tracking.uri: the MLflow server at http://127.0.0.1:9 did not answer",
    ),
    ({**GOOD, "export": {"merge": "sometimes"}}, "export.merge:"),
]


@pytest.fixture
def files(tmp_path) -> Path:
    """A valid local data file, a plain file where a directory belongs, and what the specs name them by."""
    directory = tmp_path / "files"
    directory.mkdir()
    rows = [{"text": "1 2 3 ", "label": i % 2} for i in range(20)]
    (directory / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "train.txt").write_text("not a data format")
    (tmp_path / "FILE").write_text("a file, not a directory")
    return tmp_path


def write_spec(directory: Path, spec: object) -> Path:
    path = directory / "job.yaml"
    if isinstance(spec, bytes):
        path.write_bytes(spec)
    elif isinstance(spec, str):
        path.write_text(spec)
    else:
        text = yaml.safe_dump(spec).replace("FILES/", f"{directory}/files/").replace("FILE", str(directory / "FILE"))
        path.write_text(text)
    return path


def test_the_corpus_is_large_and_distinct():
    assert len(CORPUS) >= 50
    assert len({repr(spec) for spec, _ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("spec", "expected"), CORPUS, ids=range(len(CORPUS)))
def test_each_malformed_spec_gives_one_line_naming_the_field(spec, expected, files, monkeypatch):
    monkeypatch.chdir(files)
    path = write_spec(files, spec)
    before = sorted(p.name for p in files.iterdir())
    started = time.monotonic()
    with pytest.raises(JobSpecError) as error:
        load_checked(path)
    message = str(error.value) if not expected.startswith("job.yaml") else f"job.yaml: {error.value.reason}"
    assert message.startswith(expected), message
    assert "\n" not in str(error.value)
    assert time.monotonic() - started < 10  # no network wait, no model built
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written
    assert not ray.is_initialized()


SAMPLE = [CORPUS[i] for i in (0, 5, 20, 27, 46, 57, 62, 66, 78)]


@pytest.mark.parametrize("command", ["validate", "sweep"])
@pytest.mark.parametrize(("spec", "expected"), SAMPLE, ids=range(len(SAMPLE)))
def test_the_commands_exit_2_with_the_line_and_write_nothing(command, spec, expected, files, monkeypatch):
    monkeypatch.chdir(files)
    path = write_spec(files, spec)
    before = sorted(p.name for p in files.iterdir())
    result = CliRunner().invoke(app, [command, str(path), "--set", f"output_dir={files / 'runs'}"])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"{path}: ") and expected.split(": ", 1)[-1].split(":")[0][:20] in line
    assert sorted(p.name for p in files.iterdir()) == before  # no sweep dir, no mlflow.db
    assert not ray.is_initialized()
