"""Warmup sharing through Ray (pipeline.trial.claims) on a local two-node Ray cluster (`ray.cluster_utils.Cluster`)
with no shared directory: the warmups are stored in a bucket on a real S3 server (moto on 127.0.0.1). While one trial
computes a warmup the other waits; when the first dies (its actor killed on the other node) the waiting one computes
it, and a later one loads it, bit for bit, without computing. A hung holder loses its claim when its lease runs out,
and its late renewal is refused. A whole sweep that shares its warmup there: tests/test_object_storage.py."""

from __future__ import annotations

import json
import threading

import pytest
import ray
import torch
from processes import wait_for
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.storage.paths import content_hash, storage_path
from pipeline.trial.claims import NAMESPACE, ClaimCoordinator, coordinator_name, end_coordinator
from pipeline.trial.warmup import INFO_FILE, WARMUP_DIR, WarmupStore, shared_warmup


@ray.remote(num_cpus=0)
class Computations:
    """Which trials ran a warmup computation, in order."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, name: str) -> None:
        self.names.append(name)

    def list(self) -> list[str]:
        return self.names


@ray.remote(num_cpus=0)
class TrialRank0:
    """Rank 0 of a trial as far as its warmup goes: a Ray actor (as a Ray Train worker is) running shared_warmup."""

    def warm_up(self, sweep_dir, key: dict, name: str, computations, finishes: bool):
        def compute():
            ray.get(computations.add.remote(name))
            if not finishes:  # computes until its actor is killed
                threading.Event().wait()
            return {"warmup/loss": 0.5}, {"layers.0": {"A_log": torch.arange(6.0).reshape(2, 3) + len(name)}}

        return shared_warmup(WarmupStore(sweep_dir), key, rank=0, trial_name=name, compute=compute)


@pytest.fixture(scope="module")
def driver(two_nodes):
    """This process as a driver of the cluster, for the tests that call Ray themselves."""
    ray.init(address=two_nodes.address, namespace="tests", log_to_driver=False)
    yield two_nodes
    ray.shutdown()


def test_a_trial_that_dies_while_computing_releases_its_warmup_to_the_next(driver, s3_bucket):
    head, [worker] = driver.head_node.node_id, [node.node_id for node in driver.worker_nodes]
    on = lambda node: TrialRank0.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))  # noqa: E731
    sweep_dir = storage_path(s3_bucket) / "claims"
    key = {"warmup": "of the dying trial"}
    digest = content_hash(key)
    computations = Computations.remote()
    first, second = on(worker).remote(), on(head).remote()
    first_run = first.warm_up.remote(sweep_dir, key, "trial-first", computations, finishes=False)
    wait_for(lambda: ray.get(computations.list.remote()) == ["trial-first"], 120, "the first trial to compute")
    second_run = second.warm_up.remote(sweep_dir, key, "trial-second", computations, finishes=True)
    coordinator = ray.get_actor(coordinator_name(sweep_dir), namespace=NAMESPACE)
    claim = {f"{WARMUP_DIR}/{digest}": {"holder": "trial-first", "waiting": ["trial-second"]}}
    wait_for(lambda: ray.get(coordinator.status.remote()) == claim, 60, "the second trial to wait")
    assert ray.get(computations.list.remote()) == ["trial-first"]  # it waits, it does not compute

    ray.kill(first)  # dies while computing: its claim goes to the trial that waits
    updates, metrics = ray.get(second_run, timeout=120)
    assert metrics == {"warmup/loss": 0.5, "warmup/shared": 0}
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(first_run)
    published = json.loads((sweep_dir / WARMUP_DIR / digest / INFO_FILE).read_text())
    assert published["computed_by"] == "trial-second" and ray.get(coordinator.status.remote()) == {}

    later = on(worker).remote()
    reused, metrics = ray.get(later.warm_up.remote(sweep_dir, key, "trial-later", computations, finishes=True))
    assert metrics == {"warmup/loss": 0.5, "warmup/shared": 1}
    assert torch.equal(reused["layers.0"]["A_log"], updates["layers.0"]["A_log"])
    assert ray.get(computations.list.remote()) == ["trial-first", "trial-second"]
    end_coordinator(sweep_dir)


def test_a_hung_holder_loses_its_claim_when_its_lease_runs_out(driver):
    coordinator = ray.remote(ClaimCoordinator).remote(lease_s=3.0)
    hung_token, _ = ray.get(coordinator.claim.remote("key", "hung", None))  # no actor: only its lease tells
    assert ray.get(coordinator.claim.remote("key", "next", None)) is None
    next_token, _ = wait_for(lambda: ray.get(coordinator.claim.remote("key", "next", None)), 60, "the lease to run out")
    assert not ray.get(coordinator.renew.remote("key", hung_token, "hung", None))  # fenced: it must not publish
    ray.get(coordinator.release.remote("key", hung_token))  # a late release leaves the new claim alone
    assert ray.get(coordinator.status.remote()) == {"key": {"holder": "next", "waiting": []}}
    assert ray.get(coordinator.renew.remote("key", next_token, "next", None))
