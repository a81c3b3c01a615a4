"""A sweep on a local two-node Ray cluster (`ray.cluster_utils.Cluster`): `sdtune sweep --address` places its trials
on both nodes. Each node has room for one trial's worker only, and two trials run at once. Optuna samples them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from ray.cluster_utils import Cluster

from pipeline.config import load_job
from pipeline.results import load_trials

JOB = {
    "name": "cluster",
    "model": {"builtin": "digits"},
    "data": {"task": "digits", "max_train_samples": 96, "max_eval_samples": 24},
    "method": {"name": "sdlora", "channels_frozen": 0.9, "warmup_steps": 3},
    "training": {"epochs": 1, "batch_size": 8, "lr": 2e-2, "eval_batch_size": 24},
    # A worker takes 0.9 of a one-CPU node, so no node holds two, wherever the two Tune drivers (0.05 each) sit.
    "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "trial_cpus": 0.05, "max_concurrent_trials": 2},
    # Optuna picks the trials, so this is also the suite's real Optuna sweep.
    "search": {
        "algorithm": "optuna",
        "num_samples": 2,
        "space": {"training.lr": {"loguniform": [1e-3, 3e-2]}, "method.name": {"choice": ["sdlora", "lora"]}},
    },
    "export": {"register_model": False},
}


@pytest.fixture
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_trials_run_on_both_nodes(two_nodes, tmp_path, digits_cache):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "output_dir": str(tmp_path / "runs")}))
    env = {**os.environ, "SDTUNE_CACHE": str(digits_cache), "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sweep", str(job), "--address", two_nodes.address],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    trials = load_trials(load_job(tmp_path / "runs" / "cluster" / "job.yaml"))
    assert len(trials) == 2 and all(t.status == "TERMINATED" for t in trials)
    nodes = {node.node_id for node in two_nodes.list_all_nodes()}
    assert {t.metrics["node_id"] for t in trials} == nodes
    learning_rates = [t.config["training.lr"] for t in trials]
    assert len(set(learning_rates)) == 2 and all(1e-3 <= lr <= 3e-2 for lr in learning_rates)
    assert {t.config["method.name"] for t in trials} <= {"sdlora", "lora"}
