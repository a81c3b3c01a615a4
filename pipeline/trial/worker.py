"""One trial: the SDT phases on a DeepSpeed engine, in every worker of a Ray Train worker group.

warmup (``method.warmup_steps`` optimizer steps) -> select -> restore the base, fresh adapters, a new engine with a
new optimizer and schedule -> train for ``training.epochs`` -> evaluate every epoch (and every
``training.eval_every_steps``; the test split at the end) -> ``ray.train.report(metrics, checkpoint)``. A
checkpoint holds the adapter (with its selection), the engine's optimizer and schedule state, and the data
position; a restarted trial resumes at that optimizer step with the same selection. Warmup is short and is redone
if a trial dies inside it; trials whose warmups would be identical share one (:mod:`pipeline.trial.warmup`).

The loop never waits for the GPU inside a step: losses stay on the device and are read every
``training.log_every_steps`` steps, and batches are copied to the device ahead of their step. Every report carries
the seconds the worker spent per phase (``time/*``), from which the sweep's GPU-time breakdown is built
(:func:`pipeline.results.costs.trial_cost`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import posixpath
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def module_hidden(name: str) -> Iterator[None]:
    """Inside, ``import name`` raises ImportError (a None in ``sys.modules``) unless it was imported already."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]


# DeepSpeed's autotuner, which a trial never runs, imports MLflow when DeepSpeed is imported, if it can: seconds of
# every trial's start-up, for nothing. Hidden, the autotuner records that MLflow is absent.
with module_hidden("mlflow"):
    import deepspeed
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_grad

import sdt
from pipeline.compat import deepspeed as deepspeed_compat
from pipeline.spec.job import JobSpec
from pipeline.storage.layout import ADAPTER_DIR, CHECKPOINT_PREFIX, DIVERGED_FILE, REPORTS_KEY, TRAINER_STATE
from pipeline.storage.paths import sibling_directories
from pipeline.tasks.batching import SEQ_IDX, Layout, batches_per_rank, collate_layout, epoch_batches
from pipeline.tasks.formatting import Example, pad_token_id, token_row
from pipeline.tasks.metrics import evaluate
from pipeline.tasks.sources import TaskData, load_task
from pipeline.trial.models import cpu_threads, load_base_model
from pipeline.trial.progress import MAX_LINE, WORKER_WARNING, TrialProgress
from pipeline.trial.warmup import WarmupStore, on_cpu, shared_warmup, warmup_key

ENGINE_DIR = "engine"
ENGINE_TAG = "state"


class Batches:
    """This rank's micro-batches of one epoch, in a layout of :mod:`pipeline.tasks.batching` (``padded`` until
    :meth:`use` says otherwise): the epoch's batches, from a seeded shuffle, dealt round-robin to the ranks.

    Every rank gets the same number of micro-batches, whatever the layout, so collective steps stay in lockstep.
    ``positions`` and ``tokens`` count what the batches handed out so far held: every position, and the positions
    that hold an example's token (the rest is padding).
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, rank: int, world: int, pad_id: int):
        # Converted once: converting each batch's token lists again costs the host time in every step, and small
        # models' steps are bound by the host.
        self.rows = [token_row(example) for example in examples]
        self.lengths = [len(tokens) for tokens, _ in self.rows]
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world, self.pad_id = rank, world, pad_id
        self.per_epoch = batches_per_rank(len(examples), batch_size, world)
        if self.per_epoch == 0:
            raise ValueError(
                f"training.batch_size: {batch_size} x {world} workers exceeds the {len(examples)} examples"
            )
        self.layout: Layout = "padded"
        self.positions, self.tokens = 0, 0

    def use(self, layout: Layout) -> None:
        self.layout = layout

    def epoch(self, epoch: int, device: torch.device, start: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """The epoch's micro-batches on ``device``, each copied there while the step before it still runs."""
        plan = epoch_batches(self.lengths, self.layout, self.batch_size, self.world, self.seed, epoch)
        pending = None
        for index in range(start, self.per_epoch):
            rows = [self.rows[i] for i in plan[index * self.world + self.rank]]
            batch = collate_layout(rows, self.layout, self.pad_id)
            tokens = sum(len(tokens) for tokens, _ in rows)
            counts = (batch["input_ids"].numel(), tokens)  # on the host: no sync
            if device.type == "cuda":  # pinned memory: the copy is asynchronous and overlaps the GPU's work
                batch = {key: tensor.pin_memory() for key, tensor in batch.items()}
            upcoming = (index, {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}, counts)
            if pending is not None:
                yield self.hand_out(*pending)
            pending = upcoming
        if pending is not None:
            yield self.hand_out(*pending)

    def hand_out(
        self, index: int, batch: dict[str, torch.Tensor], counts: tuple[int, int]
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """Counts a batch as it is handed out (not as it is prepared, one ahead)."""
        self.positions += counts[0]
        self.tokens += counts[1]
        return index, batch

    def padding_since(self, positions: int, tokens: int) -> float:
        """The share of pad positions in the batches handed out since the counts were ``positions``, ``tokens``."""
        handed = self.positions - positions
        return (handed - (self.tokens - tokens)) / handed if handed else 0.0


def batch_layout(spec: JobSpec, model: torch.nn.Module, lengths: list[int]) -> Layout:
    """The trial's batch layout: ``training.batching``, where ``auto`` keeps padded batches when every example has
    one length (there is no padding to save), packs examples wherever the model keeps the examples of a row apart
    exactly (Mamba-2, and the hybrids whose attention takes packed position ids, on sdt's fused path) and groups them
    by length elsewhere (Mamba-1's selective scan, transformers' own Mamba-2 path and Granite-4.0-H's attention
    cannot keep packed examples apart)."""
    asked = spec.training.batching
    if asked != "auto":
        return asked
    if len(set(lengths)) == 1:
        return "padded"
    return "packed" if sdt.fused.keeps_packed_examples_apart(model) else "grouped"


def warn_too_long(task: TaskData, max_length: int) -> None:
    """One console line when the task's examples did not all fit ``data.max_length``: how many were truncated."""
    too_long = {split: count for split, count in task.too_long().items() if count}
    if too_long:
        counts = ", ".join(f"{count} {split}" for split, count in too_long.items())
        print(
            f"{WORKER_WARNING}{counts} examples are longer than data.max_length {max_length} tokens: their prompts are"
            " cut from the left (data.too_long: refuse would stop the trial instead)",
            flush=True,
        )


def zero_stage(spec: JobSpec, world: int) -> int:
    """The ZeRO stage to run: the spec's, except that ZeRO-1 and -2 on a single rank partition nothing and cost
    their bookkeeping every step (measured in docs/benchmarks.md, "One trial step against the bare loop"), so one
    rank without offload runs stage 0. ZeRO-3 stays (one rank may offload with it)."""
    stage = spec.training.zero_stage
    return 0 if world == 1 and stage in (1, 2) and not spec.training.offload_optimizer else stage


def deepspeed_config(spec: JobSpec, full_bf16: bool, world: int = 1) -> dict[str, Any]:
    training = spec.training
    zero: dict[str, Any] = {"stage": zero_stage(spec, world)}
    if training.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if training.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    generated = {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": zero,
        # Adapters train in fp32 on a bf16 base that we cast ourselves (sdt.to_compute_dtype keeps A_log and D
        # fp32): DeepSpeed's bf16 mode would cast A_log and every adapter to bf16. Full fine-tuning of a bf16
        # model is the one case that needs it.
        "bf16": {"enabled": full_bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # Its throughput timer waits for the GPU at each step's start and end, so the host cannot queue the next
        # step while the GPU runs this one; the trial measures its own tokens/s.
        "timers": {"throughput": {"enabled": False}},
        # The optimizer is torch's AdamW (DeepSpeed's own would JIT-compile for minutes), also when offloaded.
        "zero_force_ds_cpu_optimizer": False,
    }
    return merged(training.deepspeed, generated)


def merged(extra: dict[str, Any], generated: dict[str, Any]) -> dict[str, Any]:
    """``extra`` with ``generated`` written over it, mapping by mapping: the spec's own settings win."""
    result = dict(extra)
    for key, value in generated.items():
        both_mappings = isinstance(value, dict) and isinstance(result.get(key), dict)
        result[key] = merged(result[key], value) if both_mappings else value
    return result


def make_engine(tuner: sdt.Tuner, spec: JobSpec, lr: float, total_steps: int):
    """A fresh DeepSpeed engine: torch AdamW (no JIT-compiled optimizer; fused on CUDA unless its state is
    offloaded to the host), linear decay to zero, no LR warmup."""
    params = tuner.trainable_parameters()
    fused = {"fused": True} if params[0].is_cuda and not spec.training.offload_optimizer else {}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=spec.training.weight_decay, **fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(1, total_steps)))
    full_bf16 = tuner.config.trains_all_weights and params[0].dtype == torch.bfloat16
    world = dist.get_world_size() if dist.is_initialized() else 1
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed would build its shared-memory all-reduce with g++ when its communication starts, the first
        # time under each HOME: longer than a CPU trial of sdtune's trains. A single rank reduces nothing, and
        # several reduce through gloo.
        deepspeed_compat.skip_shared_memory_allreduce_build()
    engine, _, _, _ = deepspeed.initialize(
        model=tuner.model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(spec, full_bf16, world=world),
    )
    if engine.zero_optimization_stage() == 0 and not full_bf16:
        lighten_stage0(engine, params, spec.training.grad_clip, world)
    # The base loads in eval mode; HF's Mamba mixers take the fused kernel (and mambapy's scan) only in training.
    engine.train()
    tuner.engine_wrapped()
    return engine


def lighten_stage0(engine, params: list[torch.Tensor], max_norm: float, world: int) -> None:
    """DeepSpeed's stage-0 step, without its per-tensor Python loops, which cost host time in every step where the
    host bounds the step, as it does for small models (docs/benchmarks.md, "One trial step against the bare loop").
    Same numbers: one rank has nothing to all-reduce (the all-reduce flattens every gradient
    into a bucket and copies it back), and stage 0's clipping norms each of the module's gradients one by one where
    torch's foreach clipping does it over the trainable tensors in a few kernels (after the all-reduce every rank
    holds the same gradients, so the local norm is the global one)."""
    if world == 1:
        deepspeed_compat.skip_backward_allreduce(engine)
    clip = functools.partial(torch.nn.utils.clip_grad_norm_, params, max_norm, foreach=True)
    deepspeed_compat.replace_gradient_clipping(engine, clip)


def gathered(engine, params: list[torch.Tensor]):
    """The full values of ``params`` for the ``with`` block, on every rank (a collective under ZeRO-3, which
    partitions them; a no-op otherwise)."""
    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class LossLog:
    """The training loss, kept on the device. Reading a loss (``.item()``) makes the host wait for the GPU to
    finish the step, so losses are summed where they are and read every ``log_every_steps`` optimizer steps.

    A loss that is not finite (or above ``bound``) ends the trial: :class:`DivergedError` is raised at the next read.
    """

    def __init__(self, device: torch.device, log_every_steps: int) -> None:
        self.device, self.log_every_steps = device, log_every_steps
        self.step_sum = torch.zeros((), device=device)  # the micro-batch losses of the step in progress
        self.step_count = 0
        self.report_sum = torch.zeros((), device=device)  # every micro-batch loss since the last report
        self.report_count = 0
        self.logged: list[tuple[int, torch.Tensor]] = []  # (step, mean loss) every log_every_steps steps

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.step_sum += loss
        self.report_sum += loss
        self.step_count += 1
        self.report_count += 1

    def end_step(self, step: int) -> None:
        if step % self.log_every_steps == 0:
            self.logged.append((step, self.step_sum / self.step_count))
            check_finite(self.logged[-1][1], step)
        self.step_sum = torch.zeros((), device=self.device)
        self.step_count = 0

    def take(self) -> tuple[float, list[list[float]]]:
        """(mean loss since the last report, [step, loss] points since it); starts the next report's count."""
        mean = (self.report_sum / self.report_count).item() if self.report_count else math.nan
        points = [[step, value.item()] for step, value in self.logged]
        self.report_sum, self.report_count, self.logged = torch.zeros((), device=self.device), 0, []
        return mean, points


class DivergedError(RuntimeError):
    """The training loss stopped being a finite number: the trial cannot recover, so it ends now, on every rank
    (retrying it from a checkpoint would diverge again)."""


def check_finite(loss: torch.Tensor, step: int, what: str = "the training loss") -> None:
    """Raise :class:`DivergedError` on every rank when any rank's ``loss`` is not finite (a collective, so that
    all ranks stop at the same step)."""
    value = loss.detach().float().reshape(1).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        bad = (~torch.isfinite(value)).float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise DivergedError(f"diverged: {what} is not finite at optimizer step {step}")
    elif not torch.isfinite(value).all():
        raise DivergedError(f"diverged: {what} is {value.item()} at optimizer step {step}")


class PhaseClock:
    """Wall-clock seconds this worker spends per phase (setup, warmup, train, eval, checkpoint), and of the warmup's
    and the training's, the share its steps spent on pad positions (``warmup_padding``, ``train_padding``), for the
    sweep's GPU-time breakdown. Phase boundaries wait for the GPU, so device work lands in the phase that queued it."""

    def __init__(
        self, device: torch.device, entered_at: float, driver_at: float | None, placed_at: float | None
    ) -> None:
        self.device = device
        self.worker_start = entered_at  # when the worker's training function began, before its imports
        self.driver_start = driver_at  # when the trial's Tune function began (None outside a sweep)
        self.placed = placed_at  # when its worker group got its resources (None: Ray did not say)
        self.seconds: dict[str, float] = defaultdict(float)
        self.seconds["imports"] = time.time() - entered_at
        self.mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to ``phase``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self.mark
        self.mark = now

    def metrics(self) -> dict[str, float]:
        starts = {"time/worker_start": self.worker_start}
        if self.driver_start is not None:
            starts["time/driver_start"] = self.driver_start
        if self.placed is not None:
            starts["time/placed"] = self.placed
        return {**starts, **{f"time/{k}": v for k, v in self.seconds.items()}}


def train_micro_batch(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Forward and backward of one micro-batch (already on the device); returns (loss on the device, whether this
    backward ends an optimizer step)."""
    packed = {SEQ_IDX: batch[SEQ_IDX]} if SEQ_IDX in batch else {}
    # no cache: Mamba-2, Jamba and the hybrids build one in a training forward too (their configs say use_cache),
    # and every mixer would copy its conv input and final state into it at every step
    outputs = engine(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False, **packed)
    engine.backward(outputs.loss)
    return outputs.loss, engine.is_gradient_accumulation_boundary()


def run_warmup(
    tuner: sdt.Tuner, spec: JobSpec, batches: Batches, device: torch.device, total_steps: int
) -> tuple[dict[str, float], dict]:
    """SDT warmup: the dense deltas and LoRA train for ``warmup_steps`` optimizer steps; returns its metrics and
    the dense updates (CPU copies), and drops the engine."""
    engine = make_engine(tuner, spec, spec.training.warmup_lr or spec.training.lr, total_steps)
    batches.use(batch_layout(spec, tuner.model, batches.lengths))
    losses = LossLog(device, log_every_steps=spec.training.log_every_steps)
    steps, epoch, counted = 0, 0, (batches.positions, batches.tokens)
    while steps < tuner.config.warmup_steps:
        for _, batch in batches.epoch(epoch, device):
            loss, boundary = train_micro_batch(engine, batch)
            losses.add(loss)
            if boundary and steps == 0:
                tuner.check_gradients(grad_of=safe_get_full_grad)
            engine.step()
            steps += boundary
            if boundary:
                losses.end_step(steps)
            if steps >= tuner.config.warmup_steps:
                break
        epoch += 1
    with gathered(engine, tuner.trainable_parameters()):
        updates = on_cpu(tuner.warmup_updates())
    engine.destroy()
    # A warmup that diverged ends the trial as a diverged training does, before its non-finite updates reach the
    # selection (an error there would be retried by Ray Train, to diverge again).
    finite = all(
        torch.isfinite(tensor).all() for per_parameter in updates.values() for tensor in per_parameter.values()
    )
    loss_sum = (
        losses.report_sum if finite else torch.full_like(losses.report_sum, math.nan)
    )  # on the collective's device
    check_finite(loss_sum, steps, "the SDT warmup's loss or update")
    mean, _ = losses.take()
    return {"warmup/loss": mean, "warmup/steps": steps, "warmup/padding": batches.padding_since(*counted)}, updates


def save_checkpoint(directory: Path, engine, tuner: sdt.Tuner, state: dict, rank: int) -> None:
    # Collective: each rank writes its own ZeRO partition of the optimizer state; Ray merges the workers' dirs.
    engine.save_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG, exclude_frozen_parameters=True)
    with gathered(engine, tuner.trainable_parameters()):  # the adapter whole, not rank 0's ZeRO-3 shard
        if rank == 0:
            sdt.save(tuner, directory / ADAPTER_DIR)
            (directory / TRAINER_STATE).write_text(json.dumps(state, indent=2))


def checkpoints_newest_first(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The trial's checkpoint ``latest`` (Ray's latest reported), then the ones Ray kept before it, newest first, in
    the sweep's storage (local or object storage): a truncated or corrupted latest checkpoint falls back to the one
    before."""
    earlier = sorted(sibling_directories(latest.filesystem, latest.path, prefix=CHECKPOINT_PREFIX), reverse=True)
    return [latest, *(ray.train.Checkpoint(path, filesystem=latest.filesystem) for path in earlier)]


def restore(checkpoint_dir: Path, model: torch.nn.Module, spec: JobSpec, total_steps: int):
    tuner = sdt.load(model, checkpoint_dir / ADAPTER_DIR)
    engine = make_engine(tuner, spec, spec.training.lr, total_steps)
    engine.load_checkpoint(str(checkpoint_dir / ENGINE_DIR), tag=ENGINE_TAG, load_module_strict=False)
    return tuner, engine


def evaluation_metrics(engine, task: TaskData, tokenizer, spec: JobSpec, rank: int, final: bool) -> dict[str, float]:
    """Rank 0 scores the validation split (Ray keeps only rank 0's metrics; the others report none) and, at the end
    of training, the test split too. Trials are compared on validation only; test is there to be reported.
    Under ZeRO-3 every rank runs the same evaluation: each forward gathers parameters from all ranks."""
    if rank != 0 and engine.zero_optimization_stage() != 3:
        return {}
    splits = {"eval": "validation", **({"test": "test"} if final and task.test else {})}
    metrics = {}
    for prefix, split in splits.items():
        scores = evaluate(engine.module, task, split, tokenizer, spec.data, batch_size=spec.training.eval_batch_size)
        metrics.update({f"{prefix}/{name}": value for name, value in scores.items()})
    return metrics if rank == 0 else {}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One worker's trial. A diverged trial ends on every rank without an error, which Ray Train would retry
    from the last checkpoint (to diverge again): rank 0 records why, and the trial's driver fails it
    (:func:`pipeline.trial.driver.raise_if_diverged`)."""
    context = ray.train.get_context()
    marker = config["spec"].sweep_dir / context.get_experiment_name() / DIVERGED_FILE
    if context.get_world_rank() == 0:
        marker.unlink(missing_ok=True)  # a rerun's own outcome, not an earlier run's
    try:
        run_trial(config["spec"], config["entered_at"], config.get("driver_at"), config.get("placed_at"))
    except DivergedError as diverged:
        if context.get_world_rank() == 0:
            marker.write_text(json.dumps({"reason": str(diverged)}) + "\n")


def trial_inputs(
    spec: JobSpec, device: torch.device, rank: int, world: int
) -> tuple[torch.nn.Module, Any, TaskData, Batches, int]:
    """What a trial starts from: the base model (loaded after seeding), its tokenizer, the task, this rank's
    batches and the run's optimizer steps."""
    torch.manual_seed(spec.training.seed)
    model, tokenizer = load_base_model(spec.model, device, log=print)
    task = load_task(spec.data, tokenizer)
    if rank == 0:
        warn_too_long(task, spec.data.max_length)
    training = spec.training
    batches = Batches(task.train, training.batch_size, training.seed, rank, world, pad_token_id(tokenizer))
    total_steps = training.epochs * (batches.per_epoch // training.gradient_accumulation)
    if training.max_steps:
        total_steps = min(total_steps, training.max_steps)
    return model, tokenizer, task, batches, total_steps


@dataclass
class TrialRun:
    """What one worker's trial runs with: its place in the worker group, its device, clock and inputs."""

    spec: JobSpec
    rank: int
    world: int
    trial_name: str
    device: torch.device
    clock: PhaseClock
    model: torch.nn.Module
    tokenizer: Any
    task: TaskData
    batches: Batches
    total_steps: int
    progress: TrialProgress

    @classmethod
    def set_up(cls, spec: JobSpec, entered_at: float, driver_at: float | None, placed_at: float | None) -> TrialRun:
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
        clock = PhaseClock(device, entered_at, driver_at, placed_at)
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads(spec.resources))
        model, tokenizer, task, batches, total_steps = trial_inputs(spec, device, rank, world)
        # For the sweep's console (pipeline.sweep.console): rank 0 writes its step, loss and speed at each log interval.
        progress = TrialProgress.of_this_worker(spec.sweep_dir, total_steps, spec.training.log_every_steps)
        progress.begin()
        name = context.get_experiment_name()
        return cls(spec, rank, world, name, device, clock, model, tokenizer, task, batches, total_steps, progress)

    def fresh_base(self) -> torch.nn.Module:
        self.model, _ = load_base_model(self.spec.model, self.device, log=print)
        return self.model


def run_trial(spec: JobSpec, entered_at: float, driver_at: float | None, placed_at: float | None) -> None:
    """The trial, top to bottom: set up; restore the latest readable checkpoint, or warm up and select; train,
    evaluating and checkpointing at every report."""
    run = TrialRun.set_up(spec, entered_at, driver_at, placed_at)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        restored = restore_latest(run, checkpoint)
        if restored is None:  # it had finished: its final report is made again
            return
        tuner, engine, state = restored
    else:
        tuner, warmup_metrics = warm_up_and_select(run)
        engine = make_engine(tuner, spec, spec.training.lr, run.total_steps)
        state = {"step": 0, "epoch": 0, "next_batch": 0, "warmup": warmup_metrics}
    print(tuner.kernel_path, flush=True)
    Training(run, tuner, engine, state, guarded=bool(checkpoint)).run()


def restore_latest(run: TrialRun, checkpoint: ray.train.Checkpoint) -> tuple[sdt.Tuner, Any, dict] | None:
    """The tuner, engine and data position of the newest readable checkpoint of the trial (a truncated or corrupted
    one falls back to the one before); None when that checkpoint is the trial's end, reported again here."""
    for number, candidate in enumerate(checkpoints_newest_first(checkpoint)):
        if number:  # the failed attempt may have attached adapters to the model: start from a fresh base
            run.fresh_base()
        read_from = candidate.path
        try:
            with candidate.as_directory() as local:  # a download when the sweep is in object storage
                local = read_from = Path(local)
                state = json.loads((local / TRAINER_STATE).read_text())
                if state["step"] >= run.total_steps or state["epoch"] >= run.spec.training.epochs:
                    report_finished_again(run, local, state)
                    return None
                tuner, engine = restore(local, run.model, run.spec, run.total_steps)
                return tuner, engine, state
        except (OSError, ValueError, KeyError, RuntimeError) as error:  # unreadable, corrupted, truncated
            # The checkpoint's whole path, then as much of the reason (its files named within the checkpoint) as
            # the console's line holds.
            reason = " ".join(str(error).split()).replace(f"{read_from}/", "")
            head = f"{WORKER_WARNING}checkpoint {candidate.path} cannot be restored, trying the one before it: "
            if run.rank == 0:  # every rank reads the same checkpoint: one line says it
                print(head + reason[: max(0, MAX_LINE - len(head))], flush=True)
    raise RuntimeError(f"no checkpoint of this trial in {posixpath.dirname(checkpoint.path)} can be restored")


def report_finished_again(run: TrialRun, local: Path, state: dict) -> None:
    """A trial that finished before the sweep driver died, so Tune never recorded it: its final state is reported
    again, timed as this attempt (its start-up; the finished run's phases were another run's)."""
    sdt.io.read(local / ADAPTER_DIR)  # checks the adapter before Tune is told of it
    run.clock.lap("setup")
    final = {k: v for k, v in state["metrics"].items() if not k.startswith("time/")}
    final.update({**run.clock.metrics(), "time/report_at": time.time()})
    ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(local))


def warm_up_and_select(run: TrialRun) -> tuple[sdt.Tuner, dict[str, float]]:
    """The adapters on the base and, for a method with an SDT warmup, the warmup (shared with the trials whose
    warmup would be the same) and the selection it gives; returns the tuner ready to train and the warmup's
    metrics."""
    spec = run.spec
    sdt_config = spec.method.to_sdt_config(seed=spec.training.seed)
    tuner = sdt.apply(run.model, sdt_config)
    if tuner.phase != "warmup":
        return tuner, {}
    run.clock.lap("setup")
    compute = lambda: run_warmup(tuner, spec, run.batches, run.device, run.total_steps)  # noqa: E731
    if spec.search.share_warmup:
        key = warmup_key(spec, run.total_steps, run.world, run.device)
        store = WarmupStore(spec.sweep_dir)
        updates, metrics = shared_warmup(store, key, run.rank, trial_name=run.trial_name, compute=compute)
    else:
        metrics, updates = compute()
        metrics["warmup/shared"] = 0
    run.clock.lap("warmup")
    if not metrics["warmup/shared"]:  # computed here: the share of its steps' time that went to pad positions
        run.clock.seconds["warmup_padding"] = run.clock.seconds["warmup"] * metrics["warmup/padding"]
    if spec.training.zero_stage == 3:
        # The warmup engine left its parameters partitioned: the training phase starts from a fresh base (as the
        # official code does anyway), with the selection and a LoRA initialised as it would be.
        del tuner
        model = run.fresh_base()
        return sdt.Tuner(model, sdt_config, selection=sdt.select(model, sdt_config, updates)), metrics
    tuner.start_training(tuner.select(updates))
    return tuner, metrics


class Training:
    """The training phase from a data position (``state``: step, epoch, next batch): steps, and a report (the
    evaluation, the metrics and a checkpoint) after every epoch and every ``training.eval_every_steps``."""

    def __init__(self, run: TrialRun, tuner: sdt.Tuner, engine, state: dict, guarded: bool) -> None:
        self.trial, self.tuner, self.engine, self.state = run, tuner, engine, state
        self.step, self.guarded = state["step"], guarded
        self.reports = state.get(REPORTS_KEY, 0)
        # after the engine, which settles the kernel path
        run.batches.use(batch_layout(run.spec, tuner.model, run.batches.lengths))
        run.progress.batching = run.batches.layout
        self.counted = (run.batches.positions, run.batches.tokens)  # the batches' counts at the last report
        self.losses = LossLog(run.device, run.spec.training.log_every_steps)
        self.trained_before = 0.0  # training seconds up to the last report
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        run.clock.lap("setup")

    def run(self) -> None:
        training, batches = self.trial.spec.training, self.trial.batches
        for epoch in range(self.state["epoch"], training.epochs):
            start = self.state["next_batch"] if epoch == self.state["epoch"] else 0
            for index, batch in batches.epoch(epoch, self.trial.device, start=start):
                if self.step >= self.trial.total_steps:
                    break
                boundary = self.train_step(batch)
                # An evaluation that falls on the epoch's (or the run's) last step is the epoch's report below.
                epoch_ends = index + 1 == batches.per_epoch or self.step >= self.trial.total_steps
                every = training.eval_every_steps
                if boundary and every and self.step % every == 0 and not epoch_ends:
                    self.report(epoch, index + 1)
            finished = epoch + 1 == training.epochs or self.step >= self.trial.total_steps
            self.report(epoch + 1, 0, final=finished)
            if finished:
                break

    def train_step(self, batch: dict[str, torch.Tensor]) -> bool:
        """One micro-batch; returns whether it ended an optimizer step. The first step's gradients are checked: every
        adapter tensor must get one (a kernel that bypasses an adapter would leave it at zero)."""
        loss, boundary = train_micro_batch(self.engine, batch)
        self.losses.add(loss)
        if boundary and not self.guarded:
            self.tuner.check_gradients(grad_of=safe_get_full_grad)
            self.guarded = True
        self.engine.step()
        self.step += boundary
        if boundary:
            self.losses.end_step(self.step)
            self.trial.progress.step(self.step, self.losses, self.trial.batches.tokens - self.counted[1])
        return boundary

    def report(self, epoch: int, next_batch: int, final: bool = False) -> None:
        """The metrics since the last report, the evaluation, and a checkpoint at this data position."""
        run, clock = self.trial, self.trial.clock
        clock.lap("train")
        train_seconds, self.trained_before = clock.seconds["train"] - self.trained_before, clock.seconds["train"]
        mean_loss, points = self.losses.take()
        check_finite(torch.tensor(mean_loss, device=run.device), self.step)
        # Tokens of the examples, not pad positions; the steps' time spent on padding, by its share of positions.
        tokens, padding = run.batches.tokens - self.counted[1], run.batches.padding_since(*self.counted)
        clock.seconds["train_padding"] += train_seconds * padding
        self.reports += 1
        metrics = {
            "step": self.step,
            "epoch": epoch,
            REPORTS_KEY: self.reports,
            "train/loss": mean_loss,
            "train/step_loss": points,  # a series: MLflow logs each point at its own step
            "train/padding": padding,
            "train/truncated_examples": run.task.too_long()["train"],
            "batching": run.batches.layout,
            "tokens_per_s": tokens * run.world / train_seconds if train_seconds > 0 else 0.0,
            "trainable_parameters": self.tuner.num_trainable_parameters(),
            "node_id": ray.get_runtime_context().get_node_id(),
            **self.state["warmup"],
        }
        metrics.update(evaluation_metrics(self.engine, run.task, run.tokenizer, run.spec, run.rank, final))
        clock.lap("eval")
        if run.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        metrics.update({**clock.metrics(), "time/report_at": time.time()})
        with tempfile.TemporaryDirectory() as tmp:
            position = {"step": self.step, "epoch": epoch, "next_batch": next_batch, "warmup": self.state["warmup"]}
            position[REPORTS_KEY] = self.reports
            position["metrics"] = metrics  # what to report again if the trial is restarted once finished
            save_checkpoint(Path(tmp), self.engine, self.tuner, position, run.rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        clock.lap("checkpoint")
        self.counted = (run.batches.positions, run.batches.tokens)
