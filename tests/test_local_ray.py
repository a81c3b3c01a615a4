"""The Ray instance a sweep starts here shares the machine with other Ray instances (another sweep, the tests,
another user). Its workers' state API, which Ray Train's placement-group cleaner asks whether a stopped trial's
controller is alive before it frees the trial's CPUs, must answer about this instance: asked without an address, it
scans the machine's processes and fails when it finds several, and the trials after an early stop wait forever."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
import ray

from pipeline.cli.commands import own_state_api

# Another Ray instance on this machine, up until its stdin closes.
OTHER_INSTANCE = (
    "import ray, sys; ray.init(address='local', num_cpus=1, include_dashboard=False); "
    "print('up', flush=True); sys.stdin.read()"
)
MARKER = "sdtune-own-instance"


@ray.remote(num_cpus=0)
class Marker:
    pass


@ray.remote(num_cpus=0)
def live_actor_names() -> list[str]:
    """What a worker learns from the state API, asked as Ray Train's cleaner asks it (no address)."""
    from ray.util.state import list_actors

    return [actor.name for actor in list_actors(filters=[("state", "=", "ALIVE")])]


@pytest.fixture(scope="module")
def own_instance():
    """A one-CPU Ray instance started here as a sweep starts its own, beside another Ray instance on this machine."""
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as other_tmp:  # short: Ray's socket paths are limited
        other = subprocess.Popen([sys.executable, "-c", OTHER_INSTANCE], env={**os.environ, "RAY_TMPDIR": other_tmp},
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert other.stdout.readline().strip() == "up"
            ray.init(address="local", num_cpus=1, log_to_driver=False, **own_state_api())
            try:
                yield
            finally:
                ray.shutdown()
        finally:
            other.stdin.close()
            other.wait(timeout=300)


def test_workers_ask_the_state_api_of_their_own_ray_instance(own_instance):
    marker = Marker.options(name=MARKER).remote()
    ray.get(marker.__ray_ready__.remote())
    assert MARKER in ray.get(live_actor_names.remote())


def test_the_raylets_worker_count_warning_fires_only_beyond_what_the_sweeps_trials_keep():
    """The raylet warns (a ~500-character console line) once its Python workers, less twice its 4 I/O workers,
    reach 4x its startup concurrency (ray/src/ray/raylet/worker_pool.cc); on 16 cores 12 concurrent trials passed
    that at the old fixed concurrency of 8 (bench/early_stopping.py on the H200)."""
    from pipeline.sweep.console import RAY_FIXED_PROCESSES, RAY_PROCESSES_PER_TRIAL, ray_init_options

    for trials, workers in ((2, 1), (12, 1), (4, 4)):
        concurrency = ray_init_options(True, trials, workers)["_system_config"]["worker_maximum_startup_concurrency"]
        kept = trials * (RAY_PROCESSES_PER_TRIAL + workers) + RAY_FIXED_PROCESSES
        assert 4 * concurrency + 2 * 4 > kept
        assert concurrency >= (os.cpu_count() or 1)  # never fewer processes starting at once than Ray's default
    assert ray_init_options(False, 12, 1) == {}  # an existing cluster keeps its own settings


@ray.remote(num_cpus=1)
def placement_seen_by_a_worker() -> float | None:
    from pipeline.trial.driver import placement_time

    return placement_time()


def test_a_worker_knows_when_its_placement_group_was_placed_at_once_or_after_waiting(own_instance):
    """A trial's worker reads from Ray's record when its worker group was placed (where the trial's GPU time
    begins): at once, or, for a staged trial, once a running trial's resources were freed after it waited in Ray's
    placement-group queue. One CPU: the second group waits until the first is removed."""
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    asked_first = time.time()
    running = placement_group([{"CPU": 1}])
    ray.get(running.ready())
    ready = time.time()
    in_running = PlacementGroupSchedulingStrategy(running)
    placed_at_once = ray.get(placement_seen_by_a_worker.options(scheduling_strategy=in_running).remote())
    assert placed_at_once is not None and asked_first <= placed_at_once <= ready

    asked = time.time()
    staged = placement_group([{"CPU": 1}])
    while placement_group_table(staged)["stats"]["scheduling_attempt"] < 1:  # Ray tried, and could not place it
        pass
    assert placement_group_table(staged)["state"] == "PENDING"
    freed = time.time()
    remove_placement_group(running)
    ray.get(staged.ready())
    placed = ray.get(
        placement_seen_by_a_worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(staged)).remote()
    )
    assert placed is not None and asked < freed <= placed <= time.time()
