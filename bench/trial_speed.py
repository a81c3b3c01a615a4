"""A trial's training step against the bare loop of bench/step_speed.py, in one process, steps alternated.

    python bench/trial_speed.py --hidden 2048 --layers 48 --out trial_speed.json

Both train the same SDLoRA model (random init, bf16 base, fp32 adapters, sdt's fused path on CUDA) on the same
random batches of ``--batch`` x ``--seq`` tokens:

- ``bare``: forward, loss, backward, fused AdamW step, as bench/step_speed.py times it;
- ``trial-zeroN``: what pipeline.train runs per step: the DeepSpeed engine of ``make_engine`` for a spec of ZeRO
  stage N (torch fused AdamW, gradient clipping 1.0, the linear schedule), the loss kept on the device
  (``LossLog``). On one rank ``pipeline.train.zero_stage`` runs stages 1 and 2 as stage 0 (the measurements of
  docs/benchmarks.md that compare them were taken before that rule);
- ``trial-zero0-unlightened``: stage 0 as DeepSpeed runs it by default, without ``pipeline.train.lighten_stage0``
  (its all-reduce on one rank and its per-tensor clipping loop), to show what that saves.

The modes take turns step by step. A real ``sdtune train`` of the same shape, run in the same call, is then
compared with ``bare`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import sdt
from pipeline.config import parse_job
from pipeline.train import LossLog, make_engine, train_micro_batch

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
    tuner = sdt.apply(sdt.to_compute_dtype(model, torch.bfloat16).train(), sdt.SDTConfig.preset("sdlora", warmup_steps=2))
    optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-3, fused=True)
    for step in range(2):  # a real warmup, so the selection ranks real updates
        step_bare(model, optimizer, tokens(args, step))
    tuner.start_training(tuner.select())
    if zero_stage is None:
        return tuner, torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-3, fused=True)
    spec = parse_job({**JOB, "training": {**JOB["training"], "zero_stage": zero_stage, "batch_size": args.batch}})
    engine = make_engine(tuner, spec, spec.training.lr, total_steps=10**6)
    if not lightened:
        engine.enable_backward_allreduce = True
        del engine.clip_fp32_gradients  # back to DeepSpeed's own method
    return tuner, engine


def tokens(args, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda", generator=generator)


def step_bare(model, optimizer, batch) -> None:
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_trial(engine, losses: LossLog, batch) -> None:
    loss, boundary = train_micro_batch(engine, {"input_ids": batch, "labels": batch})
    losses.add(loss)
    engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"})

    modes = {"bare": build(args, None), **{f"trial-zero{stage}": build(args, stage) for stage in args.stages}}
    if 0 in args.stages:
        modes["trial-zero0-unlightened"] = build(args, 0, lightened=False)
    losses = LossLog(torch.device("cuda"), log_every_steps=10)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for step in range(5 + args.steps):
        for mode, (tuner, runner) in modes.items():
            batch = tokens(args, 1000 + step)
            torch.cuda.synchronize()
            start = time.perf_counter()
            if mode == "bare":
                step_bare(tuner.model, runner, batch)
            else:
                step_trial(runner, losses, batch)
            torch.cuda.synchronize()
            if step >= 5:
                times[mode].append(time.perf_counter() - start)
    result = {}
    for mode, samples in times.items():
        median = statistics.median(samples)
        result[mode] = {"median_ms": 1000 * median, "tokens_per_s": args.batch * args.seq / median}
    for mode in result:
        result[mode]["vs_bare"] = result[mode]["tokens_per_s"] / result["bare"]["tokens_per_s"]
        print(f"{mode:12} {result[mode]['median_ms']:8.1f} ms  {result[mode]['tokens_per_s']:>10,.0f} tokens/s  "
              f"{result[mode]['vs_bare']:.3f}x bare")  # fmt: skip
    print(modes["bare"][0].kernel_path)
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"shape": vars(args), **result}, file, indent=2)


if __name__ == "__main__":
    main()
