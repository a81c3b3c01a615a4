"""`sdtune sweep` on CPU with real Ray Tune, Ray Train, DeepSpeed and MLflow: two concurrent trials under ASHA
(SDLoRA against a LoRA baseline), one MLflow child per trial; `sdtune resume` of a finished sweep reruns nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

JOB = {
    "name": "sweep",
    "model": {"builtin": "digits"},
    "data": {"task": "digits", "max_train_samples": 160, "max_eval_samples": 40},
    "method": {"name": "sdlora", "channels_frozen": 0.9, "warmup_steps": 4},
    "training": {"epochs": 2, "batch_size": 8, "lr": 2e-2, "zero_stage": 2, "eval_batch_size": 40},
    "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "trial_cpus": 0.25, "max_concurrent_trials": 2},
    "search": {"metric": "eval/accuracy", "mode": "max", "scheduler": "asha", "space": {"method.name": {"grid": ["sdlora", "lora"]}}},
}


def sdtune(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True, timeout=900)


def child_runs(sweep_dir):
    client = MlflowClient(f"sqlite:///{sweep_dir}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return [r for r in runs if r.data.tags.get("sdtune.role") == "trial"], [r for r in runs if r.data.tags.get("sdtune.role") == "sweep"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digits_cache):
    directory = tmp_path_factory.mktemp("sweep")
    job = directory / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "output_dir": str(directory / "runs")}))
    env = {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}
    result = sdtune("sweep", str(job), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return directory / "runs" / "sweep", result.stdout, env


def test_sweep_runs_every_trial_and_tracks_them(sweep):
    sweep_dir, stdout, _ = sweep
    assert "trials: 2 (0 failed)" in stdout
    assert "best trial: " in stdout and "eval/accuracy: " in stdout
    children, parents = child_runs(sweep_dir)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["method.name"] for r in children) == ["lora", "sdlora"]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert 0.0 <= run.data.metrics["eval/accuracy"] <= 1.0
    assert (sweep_dir / "job.yaml").is_file()


def test_resuming_a_finished_sweep_reruns_nothing(sweep):
    sweep_dir, _, env = sweep
    before = sorted((sweep_dir).glob("trial-*/checkpoint_*"))
    result = sdtune("resume", str(sweep_dir), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "trials: 2 (0 failed)" in result.stdout
    assert sorted((sweep_dir).glob("trial-*/checkpoint_*")) == before  # no trial trained again
    children, parents = child_runs(sweep_dir)
    assert len(children) == 2 and len(parents) == 1
