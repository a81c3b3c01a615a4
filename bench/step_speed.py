"""Training-step throughput of SDLoRA against weight-space LoRA (and full fine-tuning) on the fused CUDA path.

    python bench/step_speed.py --out speed.json              # mamba-130m shape, bf16, batch 8 x 1024

Every mode trains the same randomly initialised model shape: forward + loss + backward + fused AdamW step, timed
with CUDA synchronisation around each step. The modes take turns step by step, so that clock changes, garbage
collection and other drift hit all of them alike. ``host_ms`` is the time until the step's Python code has
returned (all work enqueued): when it is close to the step time, the step is bound by the host, not the GPU.
Results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import MambaConfig, MambaForCausalLM

import sdt
from pipeline.models import kernel_paths

MODES = {
    "full": sdt.SDTConfig.preset("full"),
    "lora-out": sdt.SDTConfig.preset("lora", lora_targets=("out_proj",)),
    "sdlora": sdt.SDTConfig.preset("sdlora"),
    "sdt": sdt.SDTConfig.preset("sdt"),
}


def build(mode: str, args) -> tuple[sdt.Tuner, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, state_size=16, expand=2,
        conv_kernel=4, tie_word_embeddings=True,
    )
    model = sdt.to_compute_dtype(MambaForCausalLM(config), torch.bfloat16).cuda().train()
    tuner = sdt.apply(model, MODES[mode])
    if tuner.phase == "warmup":  # a short real warmup, so the selection comes from real updates
        optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-3, fused=True)
        for step in range(2):
            step_once(tuner.model, optimizer, batch(args, step))
        tuner.start_training(tuner.select())
    optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-3, fused=True)
    return tuner, optimizer


def batch(args, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda", generator=generator)


def step_once(model, optimizer, tokens) -> None:
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_step(tuner, optimizer, tokens) -> tuple[float, float]:
    """(step seconds, host seconds) of one synchronised training step."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    step_once(tuner.model, optimizer, tokens)
    enqueued = time.perf_counter()
    torch.cuda.synchronize()
    return time.perf_counter() - start, enqueued - start


def profile(tuner, optimizer, args) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in range(3):
            step_once(tuner.model, optimizer, batch(args, 10_000 + step))
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    return f"CUDA kernel launches per step: {kernels / 3:.0f}\n{table}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["lora-out", "sdlora", "full"], choices=list(MODES))
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per mode")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--profile", nargs="*", default=[], choices=list(MODES), help="print a kernel profile")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    paths = kernel_paths("mamba")
    print("kernel paths:", paths, flush=True)
    if paths["mamba_inner_fn"] != "mamba_ssm":
        raise SystemExit("the fused mamba-ssm path is not active; refusing to time a fallback")
    runs = {mode: build(mode, args) for mode in args.modes}
    for mode, (tuner, optimizer) in runs.items():
        for step in range(args.warmup_steps):
            step_once(tuner.model, optimizer, batch(args, step))
    timings = {mode: [] for mode in args.modes}
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        for mode, (tuner, optimizer) in runs.items():
            timings[mode].append(timed_step(tuner, optimizer, batch(args, 1000 + step)))
    # every model is resident during the timing, so peak memory is measured per mode once more, alone
    peak_memory = {}
    for mode, (tuner, optimizer) in runs.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_once(tuner.model, optimizer, batch(args, 0))
        peak_memory[mode] = (torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()) / 2**30
    tokens_per_step = args.batch * args.seq
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": vars(args),
        "kernel_paths": paths,
        "modes": {},
    }
    for mode, pairs in timings.items():
        times = [t for t, _ in pairs]
        median = statistics.median(times)
        results["modes"][mode] = {
            "trainable_parameters": runs[mode][0].num_trainable_parameters(),
            "median_ms": 1000 * median,
            "min_ms": 1000 * min(times),
            "max_ms": 1000 * max(times),
            "host_median_ms": 1000 * statistics.median(h for _, h in pairs),
            "tokens_per_s": tokens_per_step / median,
            "step_peak_gib": peak_memory[mode],
            "timed_steps": len(times),
        }
    print(f"{'mode':10} {'trainable':>11} {'median ms':>10} {'range ms':>15} {'host ms':>8} {'tokens/s':>10} {'step GiB':>9}")
    for mode, r in results["modes"].items():
        print(
            f"{mode:10} {r['trainable_parameters']:>11,} {r['median_ms']:>10.1f} "
            f"{r['min_ms']:>7.1f}-{r['max_ms']:<7.1f} {r['host_median_ms']:>8.1f} {r['tokens_per_s']:>10,.0f} "
            f"{r['step_peak_gib']:>9.2f}"
        )
    if "lora-out" in results["modes"]:
        base = results["modes"]["lora-out"]["tokens_per_s"]
        for mode, r in results["modes"].items():
            r["vs_lora_out"] = r["tokens_per_s"] / base
            print(f"{mode} / lora-out tokens/s: {r['vs_lora_out']:.3f}")
    for mode in args.profile:
        print(f"\n== profile: {mode}\n{profile(*runs[mode], args)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
