"""One trial: the SDT phases on a DeepSpeed engine, in every worker of a Ray Train worker group.

warmup (``method.warmup_steps`` optimizer steps) -> select -> restore the base, fresh adapters, a new engine with a
new optimizer and schedule -> train for ``training.epochs`` -> evaluate every epoch (and every
``training.eval_every_steps``; the test split at the end) -> ``ray.train.report(metrics, checkpoint)``. A
checkpoint holds the adapter (with its selection), the engine's optimizer and schedule state, and the data
position; a restarted trial resumes at that optimizer step with the same selection. Warmup is short and is redone
if a trial dies inside it; trials whose warmups would be identical share one (:mod:`pipeline.warmup`).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import ray.train
import ray.train.torch
import torch
from deepspeed.utils import safe_get_full_grad

import sdt
from pipeline.config import JobSpec
from pipeline.formatting import Example, collate, pad_token_id
from pipeline.metrics import evaluate
from pipeline.models import load_base_model
from pipeline.results import ADAPTER_DIR
from pipeline.tasks import TaskData, load_task
from pipeline.warmup import WarmupStore, shared_warmup, warmup_key

TRAINER_STATE = "trainer_state.json"
ENGINE_DIR = "engine"
ENGINE_TAG = "state"


class Batches:
    """This rank's micro-batches of one epoch: a seeded shuffle of all examples, dealt round-robin to the ranks.

    Every rank gets the same number of micro-batches (the remainder is dropped, as the official runs drop the last
    partial batch), so collective steps stay in lockstep.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, rank: int, world: int, pad_id: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world, self.pad_id = rank, world, pad_id
        self.per_epoch = len(examples) // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"training.batch_size: {batch_size} x {world} workers exceeds the {len(examples)} examples")

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        for index in range(start, self.per_epoch):
            first = (index * self.world + self.rank) * self.batch_size
            yield index, collate([self.examples[i] for i in order[first : first + self.batch_size]], self.pad_id)


def deepspeed_config(spec: JobSpec, full_bf16: bool) -> dict[str, Any]:
    training = spec.training
    return {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": {"stage": training.zero_stage},
        # Adapters train in fp32 on a bf16 base that we cast ourselves (sdt.to_compute_dtype keeps A_log and D
        # fp32): DeepSpeed's bf16 mode would cast A_log and every adapter to bf16. Full fine-tuning of a bf16
        # model is the one case that needs it.
        "bf16": {"enabled": full_bf16},
        "steps_per_print": 10**9,
    }


def make_engine(tuner: sdt.Tuner, spec: JobSpec, lr: float, total_steps: int):
    """A fresh DeepSpeed engine: torch AdamW (no JIT-compiled optimizer), linear decay to zero, no LR warmup."""
    params = tuner.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=spec.training.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(1, total_steps)))
    full_bf16 = tuner.config.trains_all_weights and params[0].dtype == torch.bfloat16
    engine, _, _, _ = deepspeed.initialize(
        model=tuner.model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(spec, full_bf16),
    )
    # The base loads in eval mode; HF's Mamba mixers take the fused kernel (and mambapy's scan) only in training.
    engine.train()
    return engine


def train_micro_batch(engine, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, bool]:
    """Forward and backward of one micro-batch; returns (loss, whether this backward ends an optimizer step)."""
    outputs = engine(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device))
    engine.backward(outputs.loss)
    return outputs.loss.item(), engine.is_gradient_accumulation_boundary()


def run_warmup(tuner: sdt.Tuner, spec: JobSpec, batches: Batches, device: torch.device, total_steps: int) -> dict:
    """SDT warmup: the dense deltas and LoRA train for ``warmup_steps`` optimizer steps; the engine is then dropped."""
    engine = make_engine(tuner, spec, spec.training.warmup_lr or spec.training.lr, total_steps)
    steps, losses, epoch = 0, [], 0
    while steps < tuner.config.warmup_steps:
        for _, batch in batches.epoch(epoch):
            loss, boundary = train_micro_batch(engine, batch, device)
            losses.append(loss)
            if boundary and steps == 0:
                tuner.check_gradients(grad_of=safe_get_full_grad)
            engine.step()
            steps += boundary
            if steps >= tuner.config.warmup_steps:
                break
        epoch += 1
    engine.destroy()
    return {"warmup/loss": sum(losses[-10:]) / len(losses[-10:]), "warmup/steps": steps}


def save_checkpoint(directory: Path, engine, tuner: sdt.Tuner, state: dict, rank: int) -> None:
    # Collective: each rank writes its own ZeRO partition of the optimizer state; Ray merges the workers' dirs.
    engine.save_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG, exclude_frozen_parameters=True)
    if rank == 0:
        sdt.save(tuner, directory / ADAPTER_DIR)
        (directory / TRAINER_STATE).write_text(json.dumps(state, indent=2))


def restore(checkpoint_dir: Path, model: torch.nn.Module, spec: JobSpec, total_steps: int):
    tuner = sdt.load(model, checkpoint_dir / ADAPTER_DIR)
    engine = make_engine(tuner, spec, spec.training.lr, total_steps)
    engine.load_checkpoint(str(checkpoint_dir / ENGINE_DIR), tag=ENGINE_TAG, load_module_strict=False)
    return tuner, engine


def evaluation_metrics(engine, task: TaskData, tokenizer, spec: JobSpec, rank: int, final: bool) -> dict[str, float]:
    """Rank 0 scores the validation split (Ray keeps only rank 0's metrics; the others report none) and, at the end
    of training, the test split too. Trials are compared on validation only; test is there to be reported."""
    if rank != 0:
        return {}
    splits = {"eval": "validation", **({"test": "test"} if final and task.test else {})}
    metrics = {}
    for prefix, split in splits.items():
        scores = evaluate(engine.module, task, split, tokenizer, spec.data, batch_size=spec.training.eval_batch_size)
        metrics.update({f"{prefix}/{name}": value for name, value in scores.items()})
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec: JobSpec = config["spec"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    torch.manual_seed(spec.training.seed)

    model, tokenizer = load_base_model(spec.model, device)
    task = load_task(spec.data, tokenizer)
    training = spec.training
    batches = Batches(task.train, training.batch_size, training.seed, rank, world, pad_token_id(tokenizer))
    steps_per_epoch = batches.per_epoch // training.gradient_accumulation
    total_steps = training.epochs * steps_per_epoch
    if training.max_steps:
        total_steps = min(total_steps, training.max_steps)

    checkpoint = ray.train.get_checkpoint()
    warmup_metrics: dict[str, float] = {}
    if checkpoint:
        with checkpoint.as_directory() as checkpoint_dir:
            state = json.loads((Path(checkpoint_dir) / TRAINER_STATE).read_text())
            if state["step"] >= total_steps or state["epoch"] >= training.epochs:
                # Finished, but the sweep driver died before Tune recorded it: hand Tune the final report again.
                ray.train.report(state["metrics"], checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))
                return
            tuner, engine = restore(Path(checkpoint_dir), model, spec, total_steps)
    else:
        tuner = sdt.apply(model, spec.method.to_sdt_config(seed=training.seed))
        if tuner.phase == "warmup":
            updates, warmup_metrics = shared_warmup(
                WarmupStore(spec.sweep_dir),
                warmup_key(spec, total_steps, world, device),
                rank,
                trial_name=context.get_experiment_name(),
                compute=lambda: run_warmup(tuner, spec, batches, device, total_steps),
                updates_of=tuner.warmup_updates,
            )
            tuner.start_training(tuner.select(updates))
        engine = make_engine(tuner, spec, training.lr, total_steps)
        state = {"step": 0, "epoch": 0, "next_batch": 0, "warmup": warmup_metrics}

    step, losses, tokens, started, guarded = state["step"], [], 0, time.perf_counter(), bool(checkpoint)
    step_losses: list[float] = []  # the micro-batch losses of the optimizer step in progress
    loss_by_step: list[list[float]] = []  # [step, loss] every log_every_steps steps since the last report
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def report(epoch: int, next_batch: int, final: bool = False) -> None:
        nonlocal losses, loss_by_step, tokens, started
        elapsed = time.perf_counter() - started
        metrics = {
            "step": step,
            "epoch": epoch,
            "train/loss": sum(losses) / len(losses) if losses else math.nan,
            "train/step_loss": loss_by_step,  # a series: MLflow logs each point at its own step
            "tokens_per_s": tokens * world / elapsed if elapsed > 0 else 0.0,
            "trainable_parameters": tuner.num_trainable_parameters(),
            "node_id": ray.get_runtime_context().get_node_id(),
            **state["warmup"],
            **evaluation_metrics(engine, task, tokenizer, spec, rank, final),
        }
        if device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        with tempfile.TemporaryDirectory() as tmp:
            position = {"step": step, "epoch": epoch, "next_batch": next_batch, "warmup": state["warmup"]}
            position["metrics"] = metrics  # what to report again if the trial is restarted once finished
            save_checkpoint(Path(tmp), engine, tuner, position, rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        losses, loss_by_step, tokens, started = [], [], 0, time.perf_counter()

    for epoch in range(state["epoch"], training.epochs):
        start = state["next_batch"] if epoch == state["epoch"] else 0
        for index, batch in batches.epoch(epoch, start=start):
            if step >= total_steps:
                break
            loss, boundary = train_micro_batch(engine, batch, device)
            losses.append(loss)
            step_losses.append(loss)
            tokens += int(batch["input_ids"].numel())
            if boundary and not guarded:
                tuner.check_gradients(grad_of=safe_get_full_grad)
                guarded = True
            engine.step()
            step += boundary
            if boundary:
                if step % training.log_every_steps == 0:
                    loss_by_step.append([step, sum(step_losses) / len(step_losses)])
                step_losses = []
            if boundary and training.eval_every_steps and step % training.eval_every_steps == 0:
                report(epoch, index + 1)
        finished = epoch + 1 == training.epochs or step >= total_steps
        report(epoch + 1, 0, final=finished)
        if finished:
            break


def build_trainer(spec: JobSpec, name: str, callbacks: list | None = None) -> ray.train.torch.TorchTrainer:
    """The Ray Train worker group of one trial: ``resources.num_workers`` DeepSpeed ranks, checkpoints under
    ``<sweep dir>/<name>``; running it again with the same name resumes from the latest checkpoint."""
    resources = spec.resources
    use_gpu = torch.cuda.is_available() if resources.use_gpu is None else resources.use_gpu
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(spec.sweep_dir.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
