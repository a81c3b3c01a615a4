"""A trial's training loop against the bare loop of bench/step_speed.py, in one process, in alternating blocks.

    python bench/trial_speed.py --hidden 2048 --layers 48 --out trial_speed.json

Both train the same SDLoRA model (random init, bf16 base, fp32 adapters, sdt's fused path on CUDA) on random
sequences of ``--seq`` tokens, ``--batch`` per step:

- ``bare``: forward, loss, backward, fused AdamW step on batches already on the GPU, as bench/step_speed.py does;
- ``bare-clip``: the same with the trial's recipe, which a bare loop of that training would have too: gradient
  clipping at 1.0 (torch's foreach ``clip_grad_norm_``) and the linear learning-rate schedule;
- ``trial-zeroN``: pipeline.trial.worker's loop body for a spec of ZeRO stage N: ``Batches`` (host collation, pinned
  copies ahead of the step), ``train_micro_batch`` on the DeepSpeed engine of ``make_engine`` (torch fused AdamW,
  gradient clipping 1.0, the linear schedule), the loss kept on the device (``LossLog``, read every 10 steps). On
  one rank ``pipeline.trial.worker.zero_stage`` runs stages 1 and 2 as stage 0;
- ``trial-zero0-unlightened``: stage 0 as DeepSpeed runs it by default (its all-reduce on one rank, its per-tensor
  clipping loop, its throughput timer that waits for the GPU twice a step), to show what ``make_engine`` saves.

The modes take turns, ``--block`` steps at a time, for ``--blocks`` rounds; the GPU is waited for only at the ends
of a block, so a mode that makes the host wait inside a step pays for it as a trial would. The host of these
machines drifts within a run, so a mode's speed against ``bare`` (and ``bare-clip``) is the median over rounds of the
ratio of its block to the bare block of the same round; tokens/s is the median over a mode's blocks. Host ms per
step is the process's CPU time per step: where the host bounds the step, what a mode adds shows there first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import sdt
from pipeline.spec.job import parse_job
from pipeline.tasks.formatting import Example
from pipeline.trial.worker import Batches, LossLog, make_engine, train_micro_batch

JOB = {
    "name": "trial-speed",
    "model": {"architecture": "mamba"},
    "method": {"name": "sdlora", "warmup_steps": 2},
    "training": {"lr": 1e-3, "grad_clip": 1.0},
}


def build(args, zero_stage: int | None, lightened: bool = True):
    torch.manual_seed(0)
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         state_size=16, expand=2, tie_word_embeddings=True)  # fmt: skip
    with torch.device("cuda"):
        model = MambaForCausalLM(config)
    tuner = sdt.apply(
        sdt.to_compute_dtype(model, torch.bfloat16).train(), sdt.SDTConfig.preset("sdlora", warmup_steps=2)
    )
    optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-3, fused=True)
    for step in range(2):  # a real warmup, so the selection ranks real updates
        step_bare(model, optimizer, tokens(args, step))
    tuner.start_training(tuner.select())
    if zero_stage is None:
        optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-3, fused=True)
        return tuner, (optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 10**6))
    spec = parse_job({**JOB, "training": {**JOB["training"], "zero_stage": zero_stage, "batch_size": args.batch}})
    engine = make_engine(tuner, spec, spec.training.lr, total_steps=10**6)
    if not lightened:
        engine.enable_backward_allreduce = True
        del engine.clip_fp32_gradients  # back to DeepSpeed's own method
        engine.tput_timer.config.enabled = True
    return tuner, engine


def examples(args) -> list[Example]:
    """Random classification examples of ``--seq`` tokens (the answer is the last), as load_task makes them."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch * 64, args.seq), generator=generator).tolist()
    return [Example(row[:-1], row[-1:], reference=0) for row in ids]


def tokens(args, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda", generator=generator)


def step_bare(model, optimizer, batch, clipped: list[torch.Tensor] | None = None, schedule=None) -> None:
    model(input_ids=batch, labels=batch).loss.backward()
    if clipped is not None:
        torch.nn.utils.clip_grad_norm_(clipped, JOB["training"]["grad_clip"], foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if schedule is not None:
        schedule.step()


def bare_block(tuner, runner, args, first: int, recipe: bool) -> int:
    optimizer, schedule = runner
    clipped = tuner.trainable_parameters() if recipe else None
    for step in range(first, first + args.block):
        step_bare(tuner.model, optimizer, tokens(args, step), clipped, schedule if recipe else None)
    return args.block * args.batch * args.seq


def trial_block(engine, losses: LossLog, batches: Batches, args, first: int) -> int:
    """pipeline.trial.worker's loop body (run_trial): ``--block`` optimizer steps from step ``first``."""
    step, count = first, 0
    while step < first + args.block:
        epoch, start = divmod(step, batches.per_epoch)
        for _, batch in batches.epoch(epoch, torch.device("cuda"), start=start):
            loss, _ = train_micro_batch(engine, batch)
            losses.add(loss)
            count += int(batch["input_ids"].numel())
            engine.step()
            step += 1
            losses.end_step(step)
            if step == first + args.block:
                break
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--block", type=int, default=20, help="steps per block")
    parser.add_argument("--blocks", type=int, default=6, help="timed blocks per mode")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--unlightened", action="store_true", help="also time stage 0 as DeepSpeed runs it by default")
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.update(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    )

    modes = {"bare": build(args, None), "bare-clip": build(args, None)}
    modes.update({f"trial-zero{stage}": build(args, stage) for stage in args.stages})
    if args.unlightened and 0 in args.stages:
        modes["trial-zero0-unlightened"] = build(args, 0, lightened=False)
    batches = Batches(examples(args), args.batch, seed=0, rank=0, world=1, pad_id=0)  # once, as a trial does
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    host_ms: dict[str, list[float]] = {mode: [] for mode in modes}
    for block in range(1 + args.blocks):  # the first block of each mode warms it up
        for mode, (tuner, runner) in modes.items():
            first = block * args.block
            torch.cuda.synchronize()
            start, host_start = time.perf_counter(), time.process_time()
            if mode.startswith("bare"):
                count = bare_block(tuner, runner, args, first, recipe=mode == "bare-clip")
            else:
                count = trial_block(runner, LossLog(torch.device("cuda"), log_every_steps=10), batches, args, first)
            torch.cuda.synchronize()
            if block:
                rates[mode].append(count / (time.perf_counter() - start))
                host_ms[mode].append((time.process_time() - host_start) / args.block * 1e3)
    result = {}
    for mode, samples in rates.items():
        result[mode] = {
            "tokens_per_s": statistics.median(samples),
            "host_ms_per_step": statistics.median(host_ms[mode]),
            "blocks": samples,
            **{
                f"vs_{base}": statistics.median(a / b for a, b in zip(samples, rates[base]))
                for base in ("bare", "bare-clip")
            },
        }
    for mode, numbers in result.items():
        blocks = numbers["blocks"]
        print(f"{mode:24} {numbers['tokens_per_s']:>10,.0f} tokens/s  {numbers['vs_bare']:.3f}x bare  "
              f"{numbers['vs_bare-clip']:.3f}x bare-clip  host {numbers['host_ms_per_step']:.1f} ms/step  "
              f"(blocks {min(blocks):,.0f}-{max(blocks):,.0f})")  # fmt: skip
    print(modes["bare"][0].kernel_path)
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"shape": vars(args), **result}, file, indent=2)


if __name__ == "__main__":
    main()
