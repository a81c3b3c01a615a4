"""One trial as Ray sees it: a Ray Train worker group (``build_trainer``) and, in a sweep, the Tune function that
builds and fits it (``trial_driver``).

This module stays light on purpose. Ray runs the Tune function and the Train controller in fresh processes, and
what they import is start-up time during which the trial's GPU idles: they import this module (Ray, pydantic,
the job spec), never DeepSpeed, datasets or MLflow. Only the workers import :mod:`pipeline.trial.worker`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray import tune
from ray.train import UserCallback

from pipeline.compat import ray as ray_compat
from pipeline.spec.job import JobSpec, import_modules
from pipeline.storage.layout import DIVERGED_FILE, TRIAL_PREFIX
from pipeline.trial.progress import MAX_LINE, WORKER_WARNING
from sdt.compat import CompatError


def train_loop(config: dict[str, Any]) -> None:
    """The worker entry point: imports the training code in the worker only (and notes when it began, and when its
    worker group got its resources, for the trial's start-up breakdown)."""
    entered_at = time.time()
    placed_at = placement_time()
    import_modules(config["spec"].imports)  # the spec's own methods and tasks, registered in this process too
    from pipeline.trial.worker import train_loop_per_worker

    train_loop_per_worker({**config, "entered_at": entered_at, "placed_at": placed_at})


def placement_time() -> float | None:
    """When this worker's placement group (its worker group's resources) was placed: where the trial's hold on its
    GPUs begins, whether it got them at once or waited for a running trial's (a staged trial,
    :func:`pipeline.sweep.tune.trials_at_once`). None outside a placement group, or where Ray's record lacks the
    times or cannot be read: then a warning on the console says that the trial's start-up counts from Tune's start of
    it, and its cost record says so too (``placement_known``)."""
    group = ray.util.get_current_placement_group()
    if group is None:
        return None
    try:
        placed = ray_compat.placement_group_placed_at(group.id)
        reason = "Ray's record of it holds no creation time"
    except CompatError as error:
        placed, reason = None, str(error)
    if placed is None:
        consequence = ": its start-up counts from Tune's start of the trial, its queue included"
        head = f"{WORKER_WARNING}the placement time of this trial's worker group is unknown ("
        room = MAX_LINE - len(head) - len(consequence) - 1  # the console's lines are at most MAX_LINE long
        print(f"{head}{' '.join(reason.split())[:room]}){consequence}", flush=True)
    return placed


def trial_gpus(spec: JobSpec) -> float:
    """The GPUs one trial holds."""
    return spec.resources.num_workers * spec.resources.gpus_per_worker if uses_gpu(spec) else 0.0


def uses_gpu(spec: JobSpec) -> bool:
    """``resources.use_gpu``, or (None) whether the Ray cluster has any GPU."""
    if spec.resources.use_gpu is not None:
        return spec.resources.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def build_trainer(
    spec: JobSpec, name: str, callbacks: list | None = None, driver_at: float | None = None
) -> ray.train.torch.TorchTrainer:
    """The Ray Train worker group of one trial: ``resources.num_workers`` DeepSpeed ranks, checkpoints under
    ``<sweep dir>/<name>``; running it again with the same name resumes from the latest checkpoint. ``driver_at``:
    when the trial's Tune function began (for the start-up breakdown)."""
    resources = spec.resources
    use_gpu = uses_gpu(spec)
    restarts = WorkerRestartNotice(name, spec.training.max_failures)
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    return ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "driver_at": driver_at},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(spec.sweep_dir.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=spec.training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[*(callbacks or []), restarts],
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


class WorkerRestartNotice(UserCallback):
    """One console line when Ray Train restarts a trial's workers after one failed (died, or raised): which trial,
    what failed, and that it goes on from its latest checkpoint. It runs in the trial's Train controller, whose
    output reaches the console in :data:`WORKER_WARNING` lines (:mod:`pipeline.sweep.console`). A failure beyond
    ``training.max_failures`` fails the trial instead, which the sweep's own ``failed`` line says."""

    def __init__(self, name: str, max_failures: int):
        self.name, self.max_failures, self.failures = name, max_failures, 0

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1  # counted as Ray Train's failure policy counts a worker group's failures
        if 0 <= self.max_failures < self.failures:
            return
        rank, error = min(worker_exceptions.items())
        what = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        what = what.rstrip(".")
        limit = "" if self.max_failures < 0 else f" of {self.max_failures}"
        tail = (
            f"; Ray Train restarts its workers from the latest checkpoint (restart {self.failures}{limit}; "
            "the workers' output is in the sweep's logs/workers.log)"
        )
        head = f"{WORKER_WARNING}{self.name}: rank {rank} failed: "
        print(head + what[: max(0, MAX_LINE - len(head) - len(tail))] + tail, flush=True)


class TrialDiverged(RuntimeError):
    """The trial's training loss stopped being finite (the reason is the message)."""


def raise_if_diverged(spec: JobSpec, name: str) -> None:
    """Fail the trial (Tune marks it ERROR, MLflow FAILED) if its workers recorded a divergence."""
    marker = spec.sweep_dir / name / DIVERGED_FILE
    if marker.is_file():
        raise TrialDiverged(json.loads(marker.read_text())["reason"])


# How long a trial's worker group waits for its resources before Ray Train asks for them again, when it may wait for
# a running trial's GPUs: as long as that trial trains. Asked again, the group would lose its place in Ray's queue,
# and Ray Train would log a start-up failure at every timeout.
WAIT_FOR_GPUS_S = 30 * 24 * 3600


def trial_driver(config: dict[str, Any], spec: JobSpec, waits_for_gpus: bool) -> None:
    """One Tune trial: the sweep's spec with this trial's sampled values, run as a Ray Train worker group.
    ``waits_for_gpus``: the sweep runs more trials at once than the GPUs hold, and this one may wait for them."""
    driver_at = time.time()
    from ray.tune.integration.ray_train import TuneReportCallback

    if waits_for_gpus:  # Ray Train passes this variable on from here to the trial's controller
        os.environ[ray_compat.TRAIN_WORKER_GROUP_START_TIMEOUT_S] = str(WAIT_FOR_GPUS_S)

    trial_spec = spec.with_overrides(config)
    name = f"{TRIAL_PREFIX}{tune.get_context().get_trial_id()}"
    build_trainer(trial_spec, name=name, callbacks=[TuneReportCallback()], driver_at=driver_at).fit()
    raise_if_diverged(trial_spec, name)
