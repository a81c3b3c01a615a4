"""Real tokens/s and peak memory per real token of the batch layouts (pipeline/tasks/batching.py) against today's
padded batches, on a generation task's length distribution.

    python bench/packing_speed.py --arch mamba --out packing-mamba1.4b.json     # 1.4b Mamba-1: padded vs grouped
    python bench/packing_speed.py --arch mamba2 --out packing-mamba2-1.3b.json  # ~1.3B Mamba-2: padded, packed, grouped
    python bench/packing_speed.py --write-lengths samsum.json --job jobs/samsum-mamba1.4b.yaml  # where the data is
    python bench/packing_speed.py --lengths samsum.json ...                     # then time on those lengths
    python bench/packing_speed.py --quick                                       # CPU smoke run of every code path

Each layout trains SDLoRA (after a two-step warmup and selection) on the same randomly initialised model shape in
bf16, fused AdamW, on sdt's fused path, from micro-batches laid out exactly as a trial lays them out
(``epoch_batches`` + ``collate_layout``, batch size 8, the padded layout's step count): examples of the given lengths
with random token ids, prompt and answer split as a generation example is. Real tokens are the examples' tokens; a
padded batch's pad positions are not counted. The layouts take turns round by round (``--rounds``, each ``--steps``
synchronised steps per layout, the same epoch's micro-batches for every layout in a round), so that drift hits them
alike; the JSON holds every round and the median and spread over rounds. Peak memory is the most any step of a
layout allocated beyond what was resident before it, over the real tokens of that step.

Lengths: ``--lengths FILE`` (a JSON list of token counts, one per training example) as ``--write-lengths`` writes them
from a job spec's task, tokenizer and ``data.max_length`` (SAMSum: jobs/samsum-mamba1.4b.yaml; it needs the dataset).
Without a file, a stand-in: log-normal token counts, median 150, sigma 0.7, cut to [16, 1024] (mean ~190), about the
shape of SAMSum's dialogue + summary under GPT-NeoX's tokenizer; the JSON says which was used.

``--quick``: tiny shapes on the CPU, 2 rounds of 2 steps, Mamba-2's fused path on tests/fused_reference.py's
kernels (the CUDA ones need a GPU): checks that every layout runs, and times nothing worth reading.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rounds import header, quartile_text, spread, write_json
from step_speed import ARCHS, method_config, model_config

import sdt
from pipeline.tasks.batching import epoch_batches
from pipeline.tasks.formatting import IGNORE_INDEX
from pipeline.trial.worker import batch_layout

SHAPES = {"mamba": {"hidden": 2048, "layers": 48}, "mamba2": {"hidden": 2048, "layers": 48}}  # 1.4b, ~1.3B
LAYOUTS = {"mamba": ["padded", "grouped"], "mamba2": ["padded", "packed", "grouped"]}
STAND_IN = {"median": 150, "sigma": 0.7, "low": 16, "high": 1024}


def stand_in_lengths(count: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.exp(torch.randn(count, generator=generator) * STAND_IN["sigma"]) * STAND_IN["median"]
    return drawn.round().clamp(STAND_IN["low"], STAND_IN["high"]).int().tolist()


def task_lengths(job: str) -> list[int]:
    """The token count of every training example of ``job``'s task, as its trials see them."""
    from transformers import AutoTokenizer

    from pipeline.spec.job import load_job
    from pipeline.tasks.sources import load_task
    from pipeline.trial.models import fresh_config, load_base_model

    spec = load_job(job)
    if spec.model.name_or_path:  # the tokenizer alone: the checkpoint's weights are not needed
        tokenizer = AutoTokenizer.from_pretrained(spec.model.tokenizer or spec.model.name_or_path)
    elif spec.model.architecture:
        _, tokenizer = fresh_config(spec.model, {})
    else:
        _, tokenizer = load_base_model(spec.model, torch.device("cpu"))
    return [len(e.prompt_ids) + len(e.answer_ids) for e in load_task(spec.data, tokenizer).train]


def examples(lengths: list[int], vocab: int) -> list[tuple[torch.Tensor, int]]:
    """Rows as ``token_row`` gives them: random tokens, the answer the last sixth (a summary's share)."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, vocab, (n,), generator=generator), n - max(1, n // 6)) for n in lengths]


def build(args, device: str) -> tuple[sdt.Tuner, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model_class, config = model_config(args)
    with torch.device(device):
        model = model_class(config)
    model = sdt.to_compute_dtype(model, args.dtype).train()
    tuner = sdt.apply(model, method_config("sdlora", args.arch))
    if args.quick and args.arch == "mamba2":  # the CPU has no mamba-ssm: the tests' reference kernels stand in
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from fused_reference import ReferenceMamba2Kernels

        sdt.fused.install_fused_path(model, kernels=ReferenceMamba2Kernels())
    optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-4, fused=device == "cuda")
    warm = torch.randint(0, args.vocab, (2, 64), device=device)
    for _ in range(2):
        step(tuner.model, optimizer, {"input_ids": warm, "labels": warm})
    tuner.start_training(tuner.select())
    if args.quick and args.arch == "mamba2":  # start_training put the (absent) CUDA kernels back
        tuner.kernel_path = sdt.fused.install_fused_path(model, kernels=ReferenceMamba2Kernels())
    return tuner, torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-4, fused=device == "cuda")


def step(model, optimizer, batch: dict[str, torch.Tensor]) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def micro_batches(rows, lengths, layout: str, args, epoch: int) -> list[tuple[dict[str, torch.Tensor], int]]:
    """The epoch's first ``--steps`` micro-batches of rank 0 in ``layout``, each with its real token count."""
    from pipeline.tasks.batching import collate_layout

    plan = epoch_batches(lengths, layout, args.batch, 1, seed=0, epoch=epoch)[: args.steps]
    batches = []
    for indices in plan:
        batch = collate_layout([rows[i] for i in indices], layout, pad_id=0)
        batch.pop("attention_mask", None)  # a trial's training step passes none: rows are right-padded, causal
        batches.append((batch, sum(lengths[i] for i in indices)))
    return batches


def timed_round(tuner, optimizer, batches, device: str) -> dict[str, float]:
    """Real tokens/s over the batches, and the peak bytes beyond resident per real token of the worst step."""
    seconds, tokens, per_token = 0.0, 0, 0.0
    for batch, real in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        assert int((batch["labels"] != IGNORE_INDEX).sum()) > 0
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step(tuner.model, optimizer, batch)
        if device == "cuda":
            torch.cuda.synchronize()
            per_token = max(per_token, (torch.cuda.max_memory_allocated() - resident) / real)
        seconds += time.perf_counter() - start
        tokens += real
    positions = sum(batch["input_ids"].numel() for batch, _ in batches)
    return {"tokens_per_s": tokens / seconds, "peak_kib_per_token": per_token / 1024, "padding": 1 - tokens / positions}


def measure(args, lengths: list[int], device: str) -> dict[str, dict]:
    tuner, optimizer = build(args, device)
    print(tuner.kernel_path, flush=True)
    rows = examples(lengths, args.vocab)
    chosen = args.layouts or LAYOUTS[args.arch]
    auto = batch_layout_of(tuner.model, lengths)
    for layout in chosen:  # untimed: kernels warm and autotuned at the shapes each layout brings
        for batch, _ in micro_batches(rows, lengths, layout, args, epoch=10_000)[:2]:
            step(tuner.model, optimizer, {key: value.to(device) for key, value in batch.items()})
    results = {layout: [] for layout in chosen}
    for round_number in range(args.rounds):
        for layout in chosen:
            batches = micro_batches(rows, lengths, layout, args, epoch=round_number)
            results[layout].append(timed_round(tuner, optimizer, batches, device))
            print(f"round {round_number + 1} {layout}: {results[layout][-1]}", flush=True)
    return {"auto_layout": auto, "kernel_path": tuner.kernel_path, "rounds": results}


def batch_layout_of(model, lengths: list[int]) -> str:
    """What ``training.batching: auto`` picks for this model and these lengths in a trial."""
    from pipeline.spec.job import parse_job

    spec = parse_job({"name": "bench", "model": {"builtin": "digits"}})
    return batch_layout(spec, model, lengths)


def summary(measured: dict) -> dict[str, dict]:
    rounds, figures = measured["rounds"], {}
    for layout, values in rounds.items():
        figures[layout] = {key: spread([v[key] for v in values]) for key in values[0]}
    padded = statistics.median(v["tokens_per_s"] for v in rounds.get("padded", [{"tokens_per_s": float("nan")}]))
    for layout, figure in figures.items():
        figure["speedup_vs_padded"] = figure["tokens_per_s"]["median"] / padded
        print(f"{layout}: real tokens/s {quartile_text(figure['tokens_per_s'], digits=0)}; "
              f"peak KiB per real token {quartile_text(figure['peak_kib_per_token'], digits=1)}; "
              f"padding {figure['padding']['median']:.1%}; {figure['speedup_vs_padded']:.2f}x padded")  # fmt: skip
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["mamba", "mamba2"], default="mamba")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--batch", type=int, default=8, help="training.batch_size")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per layout and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", choices=["padded", "grouped", "packed"])
    parser.add_argument("--lengths", help="a JSON list of example token counts (default: the stand-in)")
    parser.add_argument("--write-lengths", help="write the token counts of --job's training examples here, and stop")
    parser.add_argument("--job", help="the job spec whose task --write-lengths reads")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, 2 rounds of 2 steps")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.write_lengths:
        if not args.job:
            raise SystemExit("--write-lengths needs --job")
        write_json(args.write_lengths, {"job": args.job, "lengths": task_lengths(args.job)})
        return
    quick = {"hidden": 64, "layers": 2, "vocab": 256, "steps": 2, "rounds": 2, "batch": 4} if args.quick else {}
    for key, value in {**SHAPES[args.arch], **quick}.items():
        if key in quick or getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = torch.float32 if args.quick else torch.bfloat16
    device = "cpu" if args.quick else "cuda"
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit("the GPU mode needs CUDA; --quick runs on the CPU")
    if args.lengths:
        import json

        lengths, source = json.loads(Path(args.lengths).read_text())["lengths"], args.lengths
    else:
        lengths, source = stand_in_lengths(2048), {"stand-in log-normal": STAND_IN}
    if args.quick:  # an eighth of the length: the CPU's reference scans step token by token
        lengths = [max(8, n // 8) for n in lengths[:64]]
    if args.quick:  # Mamba-2's fixed head count fits the real shape only: tiny shapes take the default rule
        ARCHS[args.arch]["sdt"] = {}
    measured = measure(args, lengths, device)
    shape = {key: value for key, value in vars(args).items() if key != "dtype"}
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results = {**header("packing_speed"), "device": device_name, "shape": shape, "lengths": source, **measured}
    results["figures"] = summary(measured)
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
