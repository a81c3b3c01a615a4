"""Training-step throughput of SDLoRA against weight-space LoRA and full fine-tuning, on transformers' CUDA path
and on sdt's fused path.

    python bench/step_speed.py --out speed.json                       # mamba-130m shape, bf16, batch 8 x 1024
    python bench/step_speed.py --hidden 2048 --layers 48 --modes sdlora:fused sdlora full lora-out:fused
    python bench/step_speed.py --arch mamba2 --modes sdlora:fused lora-out:fused full peft  # 130m-like Mamba-2
    python bench/step_speed.py --arch jamba --modes lora-out sdlora sdlora:fused
    python bench/step_speed.py --checkpointing --modes lora-out:fused sdlora:fused  # with gradient checkpointing
    python bench/step_speed.py --hidden 2048 --layers 48 --modes lora-out lora-out:fused state-offset:fused \
        initial-state:fused                                           # the state methods, mamba-1.4b shape
    python bench/step_speed.py --arch granitemoehybrid --batch 4 \
        --modes sdlora:fused sdlora peft-default peft-all full          # a hybrid at granite-4.0-h-1b's shape
    python bench/step_speed.py --arch granitemoehybrid --batch 4 --cuda-graph --modes sdlora:fused full

A mode is ``METHOD[:PATH]``: METHOD one of full, lora-out, sdlora, sdt, state-offset, initial-state, peft,
peft-default, peft-all; PATH ``hf`` (default: transformers' own mixer forward on the mamba-ssm kernels) or ``fused``
(``sdt.fused.install_fused_path``). The state methods run on the fused path only: off it, their mixers run
``sdt.state``'s step-by-step scan, which is no kernel path to time. ``peft`` is HF PEFT's LoRA (r 8, alpha 16, as
sdt's presets) on every mixer projection PEFT accepts for the architecture (in_proj, out_proj; x_proj and dt_proj on
Mamba-1), on transformers' path; the targets it took are printed. ``peft-default`` is PEFT's LoRA on its default
targets for the model type, ``peft-all`` on every linear layer (``target_modules="all-linear"``); a mode PEFT refuses
is printed with PEFT's reason and left out. On a hybrid (``--arch granitemoehybrid``) ``sdlora`` is sdt's hybrid
preset: SDT + LoRA on the Mamba-2 layers and LoRA on attention and MLP.
Every mode trains the same randomly initialised model shape: forward + loss + backward + fused AdamW step, timed
with CUDA synchronisation around each step. The modes take turns step by step, so that clock changes, garbage
collection and other drift hit all of them alike. ``--checkpointing`` turns on transformers' gradient checkpointing
(non-reentrant, its default) in every mode. ``host_ms`` is the time until the step's Python code has
returned (all work enqueued): when it is close to the step time, the step is bound by the host, not the GPU.
``step GiB`` is the peak memory of one step beyond what is resident before it. ``--cuda-graph`` captures each mode's
whole step as one CUDA graph after its warm-up steps and times its replays: what the step costs once its kernel
launches no longer wait on the host (the trial loop does not capture its steps; this measures what it would gain).
Results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import (
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

import sdt
from pipeline.trial.models import kernel_paths
from sdt.fused import uninstall_fused_path

PATHS = ("hf", "fused")
METHODS = ("full", "lora-out", "sdlora", "sdt", "state-offset", "initial-state")
STATE_METHODS = ("state-offset", "initial-state")
# per architecture: the shape's defaults (overridable), how to build it, and the SDT counts that fit it
ARCHS = {
    # mamba-130m: hidden 768, 24 layers, state 16, expand 2
    "mamba": {"hidden": 768, "layers": 24, "sdt": {}},
    # a 130m-like Mamba-2: 24 heads of 64, state 128, one group. 22 frozen heads: the count docs/benchmarks.md's
    # Mamba-2 figures were measured with (2 of 24 heads; 42 of 64 at --hidden 2048), not the default rule (1 in 16)
    "mamba2": {"hidden": 768, "layers": 24, "sdt": {"channels_frozen": 22}},
    # a small Jamba: hidden 1024, 8 layers (attention at 4), MoE on every other layer with 4 experts
    "jamba": {"hidden": 1024, "layers": 8, "sdt": {}},
    # a hybrid at granite-4.0-h-1b's dimensions, random weights: hidden 1536, 40 layers, 48 Mamba-2 heads of 64
    # (inner 3072), state 128, one group, conv 4, chunk 256, a shared MLP of 4096, no MoE, 12 attention heads of 128,
    # vocabulary 100,352, attention at layers 5, 15, 25 and 35 (Ollama's GGUF metadata of granite4:1b-h,
    # ollama.com/library/granite4:1b-h-q8_0/blobs/f29248184ca7, and a copy of its config.json,
    # huggingface.co/bnbnoman01/test/blob/main/config.json, whose layer_types give the attention layers; 4 KV heads
    # as granite-4.0-h-350m's config has, the 1b's not seen); the default counts
    "granitemoehybrid": {"hidden": 1536, "layers": 40, "vocab": 100352, "sdt": {}},
}
# the kernel entry point whose implementation says whether transformers' path runs on mamba-ssm
KERNEL_ENTRY = {
    "mamba": "mamba_inner_fn",
    "mamba2": "mamba2_split_conv1d_scan_combined",
    "jamba": "mamba_selective_scan",
    "granitemoehybrid": "mamba2_split_conv1d_scan_combined",
}
PEFT_METHODS = ("peft", "peft-default", "peft-all")


def method_config(method: str, arch: str) -> sdt.SDTConfig:
    sdt_counts = ARCHS[arch]["sdt"]
    return {
        "full": lambda: sdt.SDTConfig.preset("full"),
        "lora-out": lambda: sdt.SDTConfig.preset("lora", lora_targets=("out_proj",)),
        "sdlora": lambda: sdt.SDTConfig.preset("sdlora", **sdt_counts),
        "sdt": lambda: sdt.SDTConfig.preset("sdt", **sdt_counts),
        "state-offset": lambda: sdt.SDTConfig.preset("state-offset"),
        "initial-state": lambda: sdt.SDTConfig.preset("initial-state"),
    }[method]()


def parse_mode(mode: str, arch: str) -> tuple[str, str]:
    method, _, path = mode.partition(":")
    path = path or "hf"
    if method not in (*METHODS, *PEFT_METHODS) or path not in PATHS:
        raise SystemExit(
            f"mode {mode!r}: expected METHOD[:PATH], METHOD {'|'.join((*METHODS, *PEFT_METHODS))}, PATH hf|fused"
        )
    if method in PEFT_METHODS and path != "hf":
        raise SystemExit(f"mode {mode!r}: PEFT runs on transformers' path only")
    if method in STATE_METHODS and path != "fused":
        raise SystemExit(f"mode {mode!r}: a state method times on the fused path only ({method}:fused)")
    return method, path


# the mixer projections PEFT's LoRA is tried on
PEFT_TARGETS = {"mamba": ("in_proj", "x_proj", "dt_proj", "out_proj"), "mamba2": ("in_proj", "out_proj")}


class PeftRun:
    """PEFT's LoRA model behind the two calls the timing loop makes of an ``sdt.Tuner``."""

    def __init__(self, model: torch.nn.Module, args, method: str = "peft") -> None:
        """``method``: ``peft`` (the mixer projections PEFT accepts), ``peft-default`` (PEFT's default targets for
        the model type), ``peft-all`` (every linear layer). PEFT's refusal of the last two is a ``ValueError``."""
        from peft import LoraConfig, get_peft_model

        def lora(targets):
            return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)

        self.targets, self.refused = [], {}
        if method != "peft":
            self.model = get_peft_model(model, lora(None if method == "peft-default" else "all-linear"))
            self.targets = sorted(
                {name.rpartition(".")[2] for name, m in self.model.named_modules() if hasattr(m, "lora_A")}
            )
            return
        # which projections PEFT accepts, tried one at a time on a tiny model of the same architecture
        tiny_args = argparse.Namespace(**{**vars(args), "hidden": 128, "layers": 2, "vocab": 256})
        model_class, tiny_config = model_config(tiny_args)
        for target in PEFT_TARGETS.get(args.arch, ("in_proj", "out_proj")):
            try:
                get_peft_model(model_class(tiny_config), lora([target]))
                self.targets.append(target)
            except ValueError as refusal:
                self.refused[target] = str(refusal).splitlines()[0]
        self.model = get_peft_model(model, lora(self.targets))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


def model_config(args):
    common = {"vocab_size": args.vocab, "hidden_size": args.hidden, "num_hidden_layers": args.layers}
    if args.arch == "mamba":
        return MambaForCausalLM, MambaConfig(**common, state_size=16, expand=2, conv_kernel=4, tie_word_embeddings=True)
    if args.arch == "mamba2":
        heads = 2 * args.hidden // 64
        return Mamba2ForCausalLM, Mamba2Config(
            **common,
            state_size=128,
            num_heads=heads,
            head_dim=64,
            n_groups=1,
            expand=2,
            chunk_size=256,
            tie_word_embeddings=True,
        )
    if args.arch == "granitemoehybrid":
        return GraniteMoeHybridForCausalLM, GraniteMoeHybridConfig(
            **common,
            layer_types=["attention" if layer % 10 == 5 else "mamba" for layer in range(args.layers)],
            mamba_n_heads=2 * args.hidden // 64,
            mamba_d_head=64,
            mamba_d_state=128,
            mamba_n_groups=1,
            mamba_expand=2,
            mamba_chunk_size=256,
            shared_intermediate_size=8 * args.hidden // 3,
            num_local_experts=0,
            num_attention_heads=args.hidden // 128,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        )
    return JambaForCausalLM, JambaConfig(
        **common,
        attn_layer_period=8,
        attn_layer_offset=4,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        intermediate_size=4 * args.hidden,
        num_attention_heads=16,
        num_key_value_heads=4,
        mamba_d_state=16,
        tie_word_embeddings=True,
    )


def build(mode: str, args) -> tuple[sdt.Tuner | PeftRun, torch.optim.Optimizer, str]:
    method, path = parse_mode(mode, args.arch)
    torch.manual_seed(0)
    model_class, config = model_config(args)
    with torch.device("cuda"):  # initialised on the GPU: a 1.4b model takes minutes to initialise on the host
        model = model_class(config)
    model = sdt.to_compute_dtype(model, torch.bfloat16).train()
    if method in PEFT_METHODS:
        run = PeftRun(model, args, method)
        line = f"PEFT LoRA r8 on {', '.join(run.targets)}" + "".join(
            f"; refused {t}: {w}" for t, w in run.refused.items()
        )
        return run, adamw(run.trainable_parameters(), args), line
    tuner = sdt.apply(model, method_config(method, args.arch))
    if tuner.phase == "warmup":  # a short real warmup, so the selection comes from real updates
        optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-3, fused=True)
        for step in range(2):
            step_once(tuner.model, optimizer, batch(args, step))
        tuner.start_training(tuner.select())
    # sdt.Tuner puts the fused path on by itself wherever it can run: the hf modes take it off again.
    if path == "fused":
        line = tuner.kernel_path
    else:
        uninstall_fused_path(model)
        line = "transformers' path"
    if line.startswith("fused path: off"):
        raise SystemExit(f"{mode}: {line}; refusing to time a fallback")
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        line += "; gradient checkpointing (non-reentrant)"
    return tuner, adamw(tuner.trainable_parameters(), args), line


def adamw(parameters, args) -> torch.optim.Optimizer:
    # capturable: the step count lives on the GPU, so that a CUDA graph's replays advance it
    return torch.optim.AdamW(parameters, lr=1e-3, fused=True, capturable=args.cuda_graph)


def batch(args, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda", generator=generator)


def step_once(model, optimizer, tokens) -> None:
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class GraphedStep:
    """A mode's whole training step (forward, loss, backward, optimizer step) captured once as a CUDA graph, then
    replayed on new tokens copied into its input: the step with its kernel launches paid once, at capture. The
    gradients live in the graph's memory and each replay overwrites them (they were None when it was captured)."""

    def __init__(self, model, optimizer, tokens: torch.Tensor) -> None:
        self.tokens = tokens.clone()
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()  # capture wants its warm-up off the default stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step_once(model, optimizer, self.tokens)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph):
            model(input_ids=self.tokens, labels=self.tokens).loss.backward()
            optimizer.step()

    def __call__(self, tokens: torch.Tensor) -> None:
        self.tokens.copy_(tokens)
        self.graph.replay()


def stepper(tuner, optimizer, args):
    """One training step on given tokens: eager, or a replay of its CUDA graph (``--cuda-graph``)."""
    if args.cuda_graph:
        return GraphedStep(tuner.model, optimizer, batch(args, 7))
    return lambda tokens: step_once(tuner.model, optimizer, tokens)


def timed_step(step, tokens) -> tuple[float, float]:
    """(step seconds, host seconds) of one synchronised training step."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    step(tokens)
    enqueued = time.perf_counter()
    torch.cuda.synchronize()
    return time.perf_counter() - start, enqueued - start


def profile(tuner, optimizer, args) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for step in range(2):  # a mode that is only profiled was not warmed up with the timed ones
        step_once(tuner.model, optimizer, batch(args, 9_000 + step))
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in range(3):
            step_once(tuner.model, optimizer, batch(args, 10_000 + step))
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    device = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
    # where the host's time goes: on a host-bound step, this and not the kernels sets the pace
    host = events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)
    return f"CUDA kernel launches per step: {kernels / 3:.0f}\n{device}\n{host}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(ARCHS), default="mamba")
    parser.add_argument("--modes", nargs="+", default=["lora-out", "sdlora", "full"], help="METHOD[:PATH]")
    parser.add_argument("--hidden", type=int, help="default: the architecture's (see ARCHS)")
    parser.add_argument("--layers", type=int, help="default: the architecture's (see ARCHS)")
    parser.add_argument("--vocab", type=int, help="default: the architecture's, else 50280")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per mode")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--profile", nargs="*", default=[], help="modes to print a kernel profile of")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every mode")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="time each mode's step captured as one CUDA graph (replayed)"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    args.hidden = args.hidden or ARCHS[args.arch]["hidden"]
    args.layers = args.layers or ARCHS[args.arch]["layers"]
    args.vocab = args.vocab or ARCHS[args.arch].get("vocab", 50280)
    for mode in args.modes + args.profile:
        parse_mode(mode, args.arch)

    paths = kernel_paths(args.arch)
    print("kernel paths:", paths, flush=True)
    if paths[KERNEL_ENTRY[args.arch]] != "mamba_ssm":
        raise SystemExit("transformers' mamba-ssm path is not active; refusing to time a fallback")
    runs = {}
    for mode in dict.fromkeys(args.modes + args.profile):
        try:
            runs[mode] = build(mode, args)
        except ValueError as refusal:  # PEFT refuses a model type or a module (its own words)
            if not mode.startswith("peft"):
                raise
            print(f"{mode}: refused by PEFT: {str(refusal).splitlines()[0]}", flush=True)
    args.modes = [mode for mode in args.modes if mode in runs]
    args.profile = [mode for mode in args.profile if mode in runs]
    for mode, (_, _, line) in runs.items():
        print(f"{mode}: {line}", flush=True)
    steps = {}
    for mode in args.modes:
        tuner, optimizer, _ = runs[mode]
        for step in range(args.warmup_steps):
            step_once(tuner.model, optimizer, batch(args, step))
        try:
            steps[mode] = stepper(tuner, optimizer, args)
        except RuntimeError as failure:  # a step that cannot be captured (a host sync, an allocation it forbids)
            print(f"{mode}: not captured: {str(failure).splitlines()[0]}", flush=True)
    args.modes = [mode for mode in args.modes if mode in steps]
    timings = {mode: [] for mode in args.modes}
    for step in range(args.steps):
        for mode in args.modes:
            timings[mode].append(timed_step(steps[mode], batch(args, 1000 + step)))
    # every model is resident during the timing, so peak memory is measured per mode once more, alone (a graph's
    # memory is its pool's, taken at capture: a replay adds nothing, so with --cuda-graph this reads about 0)
    peak_memory = {}
    for mode in args.modes:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        steps[mode](batch(args, 0))
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
            "path_line": runs[mode][2],
            "trainable_parameters": runs[mode][0].num_trainable_parameters(),
            "median_ms": 1000 * median,
            "min_ms": 1000 * min(times),
            "max_ms": 1000 * max(times),
            "host_median_ms": 1000 * statistics.median(h for _, h in pairs),
            "tokens_per_s": tokens_per_step / median,
            "step_peak_gib": peak_memory[mode],
            "timed_steps": len(times),
        }
    header = f"{'mode':14} {'trainable':>13} {'median ms':>10} {'range ms':>15} {'host ms':>8} {'tokens/s':>10}"
    print(f"{header} {'step GiB':>9}")
    for mode, r in results["modes"].items():
        print(
            f"{mode:14} {r['trainable_parameters']:>13,} {r['median_ms']:>10.1f} "
            f"{r['min_ms']:>7.1f}-{r['max_ms']:<7.1f} {r['host_median_ms']:>8.1f} {r['tokens_per_s']:>10,.0f} "
            f"{r['step_peak_gib']:>9.2f}"
        )
    # every mode against each baseline that ran: LoRA on out_proj and full fine-tuning on transformers' path,
    # and each method's own transformers-path run
    baselines = [b for b in ("lora-out", "lora-out:fused", "full", *PEFT_METHODS) if b in results["modes"]]
    for mode, r in results["modes"].items():
        method = mode.partition(":")[0]
        ratios = {f"vs_{b}": r["tokens_per_s"] / results["modes"][b]["tokens_per_s"] for b in baselines if b != mode}
        if mode != method and method in results["modes"] and method not in baselines:
            ratios["vs_own_hf_path"] = r["tokens_per_s"] / results["modes"][method]["tokens_per_s"]
        r.update(ratios)
        if ratios:
            print(f"{mode} tokens/s " + ", ".join(f"{k.removeprefix('vs_')}: {v:.3f}x" for k, v in ratios.items()))
    for mode in args.profile:
        print(f"\n== profile: {mode}\n{profile(*runs[mode][:2], args)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
