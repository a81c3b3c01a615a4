"""A sweep in object storage, on a local two-node Ray cluster (`ray.cluster_utils.Cluster`) whose only common storage
is a bucket on a real S3 server (moto on 127.0.0.1): `sdtune sweep --address` with `output_dir: s3://...`, Optuna
sampling its trials, two at a time, one on each node; its driver killed (SIGKILL) once Tune's state in the bucket
records a finished trial. `sdtune resume` finishes the sweep without training that trial again, the shared warmup
was computed once for the three trials, and the export in the bucket (and a merged one exported from it to a local
directory) holds the best trial's adapter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow.fs
import pytest
import torch
import yaml
from processes import finished_trials, wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from pipeline.cli.commands import app
from pipeline.results.outcomes import load_trials, sweep_spec
from pipeline.spec.job import parse_job
from pipeline.storage.paths import STATE_ENV, local_state_dir, storage_path
from pipeline.tasks.metrics import evaluate
from pipeline.tasks.sources import load_task
from pipeline.trial.warmup import INFO_FILE, WARMUP_DIR

JOB = {
    "name": "s3-sweep",
    "model": {"builtin": "digits"},
    "data": {"task": "digits", "max_train_samples": 64, "max_eval_samples": 24},
    "method": {"name": "sdlora", "warmup_steps": 3},
    "training": {"epochs": 1, "batch_size": 8, "lr": 2e-2, "warmup_lr": 2e-2, "eval_batch_size": 24},
    # A worker takes 0.9 of a one-CPU node, so no node holds two, wherever the Tune drivers (0.05 each) sit.
    "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "trial_cpus": 0.05, "max_concurrent_trials": 2},
    # The suite's real Optuna sweep. Its three trials differ in the learning rate and in a ratio the selection
    # applies, not in the warmup (its learning rate is fixed): one warmup for all of them.
    "search": {
        "algorithm": "optuna",
        "num_samples": 3,
        "space": {"training.lr": {"loguniform": [1e-3, 3e-2]}, "method.channels_frozen": {"choice": [0.9, 0.8, 0.7]}},
    },
}
EXPORT_FILES = {"adapter_config.json", "adapter_model.safetensors", "trial.json", "job.yaml", "README.md"}


def listing(directory) -> list[str]:
    """The files under ``directory`` in object storage, relative to it."""
    filesystem, path = directory.filesystem()
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(e.path.removeprefix(f"{path}/") for e in entries if e.type == pyarrow.fs.FileType.File)


@pytest.fixture(scope="module")
def sweep(two_nodes, s3_bucket, digits_cache, tmp_path_factory):
    """The sweep killed after its first finished trial and resumed: (spec, the trials finished before the kill with
    their checkpoints then, resume's stdout, the environment)."""
    root = tmp_path_factory.mktemp("s3-sweep")
    env = {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled", STATE_ENV: str(root / "state")}
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "output_dir": str(storage_path(s3_bucket) / "runs")}))
    spec = parse_job({**JOB, "output_dir": str(storage_path(s3_bucket) / "runs")})
    command = [sys.executable, "-m", "pipeline.cli.commands"]
    log = open(root / "killed-driver.log", "w")  # what it printed, for a failure of this fixture
    first = subprocess.Popen([*command, "sweep", str(job), "--address", two_nodes.address], env=env, stdout=log,
                             stderr=subprocess.STDOUT)  # fmt: skip
    try:
        # Once a second: each look is two requests to the S3 server, which serves them in this process, on the
        # CPUs the sweep runs on (at ten a second, the server took as much CPU as the sweep's trials).
        wait_for(
            lambda: finished_trials(spec.sweep_dir / "tune") >= 1, 600, "a finished trial in the bucket", every=1.0
        )
    finally:
        first.send_signal(signal.SIGKILL)  # as a crash would: no cleanup of any kind
        first.wait()
        log.close()
    finished_before = {t.trial_id: listing(t.checkpoint.parent) for t in load_trials(spec) if t.status == "TERMINATED"}
    resumed = subprocess.run([*command, "resume", str(spec.sweep_dir), "--address", two_nodes.address], env=env,
                             capture_output=True, text=True, timeout=900)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    return spec, finished_before, resumed.stdout, env


def test_a_sweep_in_object_storage_resumes_after_its_driver_is_killed(sweep, two_nodes, monkeypatch):
    spec, finished_before, stdout, env = sweep
    monkeypatch.setenv(STATE_ENV, env[STATE_ENV])
    assert "trials: 3 (0 failed)" in stdout and finished_before
    assert sweep_spec(str(spec.sweep_dir)) == spec  # job.yaml, in the bucket
    trials = load_trials(spec)
    assert len(trials) == 3 and all(t.status == "TERMINATED" for t in trials)
    for trial in trials:
        if trial.trial_id in finished_before:  # not trained again
            assert listing(trial.checkpoint.parent) == finished_before[trial.trial_id]
        else:  # run by the resumed driver (trained on, or finished before the kill and only reported again): timed
            assert trial.cost and abs(trial.cost["other"]) <= 0.05 * trial.cost["wall"], (trial.trial_id, trial.cost)
    assert {t.metrics["node_id"] for t in trials} == {node.node_id for node in two_nodes.list_all_nodes()}
    # Optuna's samples, the resumed sweep's included, from the space
    learning_rates = [t.config["training.lr"] for t in trials]
    assert len(set(learning_rates)) == 3 and all(1e-3 <= lr <= 3e-2 for lr in learning_rates)
    assert {t.config["method.channels_frozen"] for t in trials} <= {0.9, 0.8, 0.7}
    # this machine kept only the lock, the MLflow store and the libraries' logs; the sweep's files are in the bucket
    state = local_state_dir(spec.sweep_dir)
    assert {p.name for p in state.iterdir()} == {".sdtune.lock", "mlflow.db", "mlartifacts", "logs"}
    assert {"job.yaml", "report/summary.md"} <= set(listing(spec.sweep_dir))


def test_the_shared_warmup_was_computed_once_for_the_sweep(sweep):
    spec, _, _, _ = sweep
    [marker] = [name for name in listing(spec.sweep_dir / WARMUP_DIR) if name.endswith(f"/{INFO_FILE}")]
    computed_by = json.loads((spec.sweep_dir / WARMUP_DIR / marker).read_text())["computed_by"]
    trials = load_trials(spec)
    assert computed_by in {f"trial-{t.trial_id}" for t in trials}
    # each trial loaded it, except at most the one that computed it (if it survived the kill)
    assert {f"trial-{t.trial_id}" for t in trials if t.metrics["warmup/shared"] == 0} <= {computed_by}


def test_the_export_in_the_bucket_holds_the_best_trial_and_exports_merged(sweep, tmp_path):
    spec, _, stdout, env = sweep
    export = spec.sweep_dir / "export"
    assert set(listing(export)) == EXPORT_FILES and f"exported to {export}" in stdout
    record = json.loads((export / "trial.json").read_text())
    best = max(load_trials(spec), key=lambda t: t.metrics["eval/accuracy"])
    assert record["metrics"]["eval/accuracy"] == best.metrics["eval/accuracy"]
    assert str(record["mlflow"]["registered_model"]["version"]) == "1"  # in the MLflow store on this machine

    out = tmp_path / "merged-export"
    # in this process (no Ray here): a subprocess would spend ~10 s importing the stack
    result = CliRunner().invoke(app, ["export", str(spec.sweep_dir), "--out", str(out), "--merge"],
                                env={STATE_ENV: env[STATE_ENV]})  # fmt: skip
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    assert json.loads((out / "trial.json").read_text())["checkpoint"] == record["checkpoint"]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    winner = best.spec
    scores = evaluate(merged, load_task(winner.data, tokenizer), "validation", tokenizer, winner.data,
                      batch_size=winner.training.eval_batch_size)  # fmt: skip
    assert scores["accuracy"] == pytest.approx(record["metrics"]["eval/accuracy"], abs=1e-9)


def test_a_cluster_too_small_for_a_trial_is_refused_before_anything_is_written(two_nodes, digits_cache, tmp_path):
    """The two one-CPU nodes hold no worker of 1.5 CPUs, though the cluster has 2 CPUs (Ray would wait forever):
    `sweep --address` says so in one line naming the field and exits 2, with no sweep directory (no job.yaml, lock
    file or logs/); so does `resume --address` of an existing sweep, which keeps its files as they were."""
    env = {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}
    job = tmp_path / "job.yaml"
    too_big = {**JOB["resources"], "cpus_per_worker": 1.5}
    job.write_text(yaml.safe_dump({**JOB, "resources": too_big, "output_dir": str(tmp_path / "runs")}))
    command = [sys.executable, "-m", "pipeline.cli.commands"]
    refused = subprocess.run([*command, "sweep", str(job), "--address", two_nodes.address], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = refused.stdout.strip().splitlines() + refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stdout + refused.stderr
    assert (
        "resources.cpus_per_worker: a worker needs 1.5 CPUs on one node; the cluster's largest node has 1" in lines[0]
    )
    assert not (tmp_path / "runs").exists()

    sweep_dir = tmp_path / "runs" / JOB["name"]
    sweep_dir.mkdir(parents=True)
    spec = parse_job({**JOB, "resources": too_big, "output_dir": str(tmp_path / "runs")})
    (sweep_dir / "job.yaml").write_text(spec.to_yaml())
    before = {path.name: path.read_bytes() for path in sweep_dir.iterdir()}
    resumed = subprocess.run([*command, "resume", str(sweep_dir), "--address", two_nodes.address], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 2 and "resources.cpus_per_worker" in resumed.stdout + resumed.stderr
    assert {path.name: path.read_bytes() for path in sweep_dir.iterdir()} == before
