"""The SDT warmup, computed once per sweep for every trial that would compute the same one.

A warmup's result (the dense per-layer updates that SDT ranks) depends on the base model, the data, the seed, the
batch, the warmup length, its learning rate and schedule, the optimizer's arithmetic (ZeRO stage, offloading, the
DeepSpeed settings, the threads of a trial on the CPU), the world size, the LoRA that trains beside it, and the compute
dtype; it does not depend on the channel / state ratios, which act only in the selection afterwards. So trials that
differ only in ratios (or in the training-phase lr) share one warmup: :func:`warmup_key` lists those inputs
(``tests/test_warmup.py`` flips every setting of the spec and checks which ones move it), its hash names
``<sweep dir>/warmup/<hash>/`` (``updates.safetensors``, then ``warmup.json``, the marker of a published warmup), in
the sweep's storage, local or object storage (:mod:`pipeline.storage.paths`), and

- a trial that finds it published loads it;
- otherwise it asks the sweep's claim coordinator, a Ray actor (:mod:`pipeline.trial.claims`): the one granted the key
  computes the warmup and publishes it; the others wait and then load it. A trial that dies while computing
  loses its claim, and the next one computes it. No shared filesystem is needed.

Only rank 0 of a trial touches the store and the coordinator, and it broadcasts the updates to the other ranks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load, save_file

from pipeline import __version__
from pipeline.spec.job import JobSpec
from pipeline.storage.paths import StoragePath, content_hash, write_directory
from pipeline.trial.claims import Lease, claimed

WARMUP_DIR = "warmup"
UPDATES_FILE = "updates.safetensors"
INFO_FILE = "warmup.json"
# Bump when the warmup loop changes what the same inputs produce.
RECIPE_VERSION = 2  # 2: batches laid out by training.batching (grouped or packed where lengths vary)
# DataSpec fields that shape only the evaluation splits and their scoring, never the training batches.
# Data settings that leave the warmup's batches as they are: evaluation's, and too_long (truncate gives the batches
# any way; refuse ends the trial before its warmup).
WARMUP_BLIND_DATA_FIELDS = ("max_eval_samples", "scoring", "num_beams", "max_new_tokens", "too_long")

Updates = dict[str, dict[str, torch.Tensor]]  # mixer prefix -> warmup tensor key -> dense update


def warmup_key(spec: JobSpec, total_steps: int, world_size: int, device: torch.device) -> dict[str, Any]:
    """Everything the warmup's result depends on, and nothing else."""
    from pipeline.trial.models import compute_dtype, cpu_threads

    training = spec.training
    return {
        "recipe": RECIPE_VERSION,
        "sdtune": __version__,
        "model": spec.model.model_dump(mode="json"),
        "data": spec.data.model_dump(mode="json", exclude=set(WARMUP_BLIND_DATA_FIELDS)),
        "method": spec.method.to_sdt_config(seed=training.seed).warmup_inputs(),
        "seed": training.seed,
        "batch_size": training.batch_size,
        # The layout auto picks follows from the model, the data and the device, all in this key.
        "batching": training.batching,
        "gradient_accumulation": training.gradient_accumulation,
        "lr": training.warmup_lr or training.lr,
        "weight_decay": training.weight_decay,
        "grad_clip": training.grad_clip,
        # How the optimizer steps: the ZeRO stage, and offloading, which moves AdamW's step to the host (and keeps
        # ZeRO on a single rank, where it would otherwise step as stage 0); the spec's own DeepSpeed settings.
        "zero_stage": training.zero_stage,
        "offload_optimizer": training.offload_optimizer,
        "offload_parameters": training.offload_parameters,
        "deepspeed": training.deepspeed,
        # The warmup's lr decays linearly over the whole run, as in the official code.
        "schedule_steps": total_steps,
        "world_size": world_size,
        "device": device.type,
        # On the CPU a worker runs as many torch threads as its whole CPUs, and the threads split the float sums.
        "cpu_threads": cpu_threads(spec.resources) if device.type == "cpu" else None,
        "dtype": str(compute_dtype(spec.model, device)),
    }


class WarmupStore:
    """Published warmups under ``<sweep dir>/warmup``, one folder per key hash, in the sweep's storage."""

    def __init__(self, sweep_dir: StoragePath):
        self.sweep_dir = sweep_dir
        self.root = sweep_dir / WARMUP_DIR

    def entry(self, digest: str) -> StoragePath:
        return self.root / digest

    def published(self, digest: str) -> bool:
        return (self.entry(digest) / INFO_FILE).is_file()

    def claim(self, digest: str, trial_name: str) -> AbstractContextManager[Lease | None]:
        """Held while one trial looks up and, if need be, computes the warmup of ``digest`` (a :class:`Lease`); None
        once another trial has published it. A trial that dies loses its claim, and the next one computes it."""
        return claimed(self.sweep_dir, f"{WARMUP_DIR}/{digest}", trial_name, done=lambda: self.published(digest))

    def load(self, digest: str) -> tuple[Updates, dict[str, Any]] | None:
        entry = self.entry(digest)
        if not self.published(digest):
            return None
        info = json.loads((entry / INFO_FILE).read_text())
        updates: Updates = {}
        for name, tensor in load((entry / UPDATES_FILE).read_bytes()).items():
            prefix, key = name.rsplit("/", 1)
            updates.setdefault(prefix, {})[key] = tensor
        return updates, info

    def publish(self, digest: str, updates: Updates, info: dict[str, Any]) -> StoragePath:
        tensors = {f"{prefix}/{key}": t.contiguous() for prefix, by_key in updates.items() for key, t in by_key.items()}

        def write(folder: Path) -> None:
            save_file(tensors, str(folder / UPDATES_FILE))
            (folder / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

        return write_directory(self.entry(digest), write, marker=INFO_FILE)


def on_cpu(updates: Updates) -> Updates:
    """CPU copies of warmup updates. Selection always ranks CPU copies, so a reused warmup (loaded on the CPU)
    ranks exactly as the computed one did."""
    return {prefix: {k: t.cpu() for k, t in by_key.items()} for prefix, by_key in updates.items()}


def _broadcast(value: Any, rank: int) -> Any:
    """``value`` of rank 0 on every rank (a no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shared_warmup(
    store: WarmupStore,
    key: dict[str, Any],
    rank: int,
    trial_name: str,
    compute: Callable[[], tuple[dict[str, float], Updates]],
) -> tuple[Updates, dict[str, float]]:
    """The warmup updates of ``key`` and its metrics: published ones when they exist, else ``compute()`` (its
    metrics and updates) on every rank, published. ``warmup/shared`` is 1 for a reused warmup."""
    digest = content_hash(key)
    with store.claim(digest, trial_name) if rank == 0 else nullcontext() as lease:
        found = store.load(digest) if rank == 0 else None
        found = _broadcast(found, rank)
        if found is not None:
            updates, info = found
            return updates, {**info["metrics"], "warmup/shared": 1}
        metrics, updates = compute()
        updates = on_cpu(updates)
        if rank == 0:
            if lease.held():
                info = {"key": key, "hash": digest, "computed_by": trial_name, "metrics": metrics}
                store.publish(digest, updates, info)
            else:  # it stopped renewing its claim for a lease, and another trial took the key over
                print(f"warmup {digest}: another trial took this trial's claim over; not publishing", flush=True)
    return updates, {**metrics, "warmup/shared": 0}
