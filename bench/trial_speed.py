"""The trial a user runs (`sdtune train`, and one trial of `sdtune sweep` under Ray Tune), each against the bare
training loop on the same shape, in alternating rounds.

    python bench/trial_speed.py --out trial_speed.json                 # both, 5 rounds (GPU)
    python bench/trial_speed.py --modes train --out trial_speed.json   # `sdtune train` against the bare loop only
    python bench/trial_speed.py --quick --out /tmp/trial_speed.json    # a tiny shape on the CPU: a smoke test

Every run is a fresh process, started as a user starts it, and every round runs ``bare``, then ``train``, then
``sweep`` (bare, train, sweep, bare, train, sweep, ...): the host of the lent GPU machines drifts over minutes, so
each trial is compared with the bare run of its own round. One untimed import of the worker's code comes first, so
that the first round does not read the packages from disk alone.

- ``train``: ``sdtune train JOB``: a local Ray instance, one Ray Train worker with DeepSpeed, the SDT warmup and
  selection, the training steps, an evaluation and a checkpoint.
- ``sweep``: ``sdtune sweep JOB`` with an empty search space: the same trial under Ray Tune, with the sweep's MLflow
  tracking, export (no registry) and report.
- ``bare``: ``python bench/trial_speed.py --bare JOB``: the loop a person would write for the same training, in one
  process without Ray, DeepSpeed, MLflow, evaluation or checkpoints: the same model and examples (sdtune's loaders),
  collated into batches of the same shape and copied to the device before the clock starts; the SDT warmup and
  selection (same steps, same learning rate); then the training steps with a fresh fused AdamW, gradient clipping
  (torch's foreach ``clip_grad_norm_``) and the linear learning-rate decay, as the trial's recipe has them.

JOB is bench/trial_mamba130m.yaml: mamba-130m's shape (hidden 768, 24 layers, vocab 50280) built from its config with
random weights, bf16 with A_log, D and the adapters in fp32, SDLoRA after 20 warmup steps, 100 optimizer steps of
8 rows of 1,022 tokens (bench/long_sequences.py; every row one length, so no padding), one GPU, ZeRO-2 (which one
rank runs as stage 0). What each round measures:

- **training throughput**, tokens/s: the examples' tokens (not pad positions) of the training phase's optimizer
  steps (after the warmup and the selection) over the seconds from the start of the first step to the GPU's end of
  the last. For ``train`` and ``sweep``, the ``tokens_per_s`` of the trial's last report, as the trial reports it
  (one epoch, one report: the whole training phase); the bare loop times the same span the same way (the GPU
  waited for before and after). Both include the first step.
- **end-to-end wall time**, s: from launching the command to its exit, start-up included (Python, imports, Ray,
  the model and data, warmup, training, and for the trials the evaluation, checkpoint, tracking, shutdown).

Printed per round: each figure, and the trial's throughput over the bare run's and its wall time minus the bare
run's; then per figure the median, quartiles and range over the rounds. ``--out`` gets every round and the summary.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from long_sequences import write_rows
from rounds import SDTUNE, header, quartile_text, spread, timed_command, warm_up_imports, write_json

JOB = str(Path(__file__).with_name("trial_mamba130m.yaml"))
MODES = ("train", "sweep")
# A tiny shape for a smoke test on the CPU: the same runs, in seconds of training.
QUICK = [
    "resources.use_gpu=false",
    "resources.cpus_per_worker=1",
    "model.config={hidden_size: 64, num_hidden_layers: 2, state_size: 8, tie_word_embeddings: true}",
    "training.max_steps=10",
    "method.warmup_steps=2",
    "data.max_eval_samples=8",
    "training.eval_batch_size=8",
]
BARE_LINE = "bare loop: "
# The seconds per phase a trial's report carries (pipeline.trial.worker.PhaseClock), kept with each train run.
PHASES = ("imports", "setup", "warmup", "train", "eval", "checkpoint")  # the bare run's one line of results, as JSON


# ---------------------------------------------------------------------------------------------------------------
# The bare loop (a process of its own, as each round starts it)


def bare_loop(job: str, overrides: list[str]) -> dict[str, Any]:
    """The job's training as a bare loop; returns its training throughput and what it ran on."""
    import torch

    import sdt
    from pipeline.spec.job import load_job
    from pipeline.tasks.formatting import pad_rows, pad_token_id, token_row
    from pipeline.tasks.sources import load_task
    from pipeline.trial.models import load_base_model

    spec = load_job(job, overrides)
    training = spec.training
    device = torch.device("cuda" if spec.resources.use_gpu is not False and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))  # as the trial's worker does
    torch.manual_seed(training.seed)
    model, tokenizer = load_base_model(spec.model, device, log=lambda line: None)
    rows = [token_row(example) for example in load_task(spec.data, tokenizer).train]
    steps = training.max_steps or training.epochs * (len(rows) // training.batch_size)
    size, pad = training.batch_size, pad_token_id(tokenizer)
    needed = max(steps, spec.method.warmup_steps or 0)
    batches = [pad_rows([rows[(step * size + i) % len(rows)] for i in range(size)], pad) for step in range(needed)]
    batches = [{key: tensor.to(device) for key, tensor in batch.items()} for batch in batches]
    tuner = sdt.apply(model.train(), spec.method.to_sdt_config(seed=training.seed))
    if tuner.phase == "warmup":
        train_steps(tuner, batches[: tuner.config.warmup_steps], training.warmup_lr or training.lr, training, steps)
        tuner.start_training(tuner.select())
    if device.type == "cuda" and tuner.kernel_path.startswith("fused path: off"):
        raise SystemExit(f"bare loop: {tuner.kernel_path}; refusing to time a fallback")
    synchronize(device)
    began = time.perf_counter()
    train_steps(tuner, batches[:steps], training.lr, training, steps)
    synchronize(device)
    seconds = time.perf_counter() - began
    positions = sum(int(batch["input_ids"].numel()) for batch in batches[:steps])
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches[:steps])  # the examples', as a trial counts
    return {
        "tokens_per_s": tokens / seconds,
        "train_s": seconds,
        "steps": steps,
        "tokens": tokens,
        "padding_share": 1 - tokens / positions,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "kernel_path": tuner.kernel_path,
    }


def train_steps(tuner, batches: list[dict], lr: float, training, total_steps: int) -> None:
    """One optimizer step per batch: fused AdamW (on CUDA), foreach gradient clipping, linear decay to zero over
    ``total_steps``, as the trial's engine (pipeline.trial.worker.make_engine) does."""
    import torch

    params = tuner.trainable_parameters()
    fused = {"fused": True} if params[0].is_cuda else {}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=training.weight_decay, **fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(1, total_steps)))
    for batch in batches:
        tuner.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, training.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# The rounds


def settings(args, work: Path, name: str) -> list[str]:
    """``--set`` values of every run: the bench's data and output directory, the quick shape, the caller's own."""
    return [
        f"data.data_files.train={work / 'long.jsonl'}",
        f"output_dir={work / 'runs'}",
        f"name={name}",
        "export.register_model=false",
        *(QUICK if args.quick else []),
        *args.overrides,
    ]


def as_set_options(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def run_bare(args, work: Path, name: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--bare", args.job, *as_set_options(settings(args, work, name))]
    wall, output = timed_command(command, "the bare loop")
    [line] = [line for line in output.splitlines() if line.startswith(BARE_LINE)]
    return {"wall_s": wall, **json.loads(line.removeprefix(BARE_LINE))}


def printed_metrics(output: str) -> dict[str, Any]:
    """The ``key: value`` lines `sdtune train` prints of its last report."""
    metrics = {}
    for key, value in re.findall(r"^([\w/]+): (\S+)$", output, flags=re.M):
        try:
            metrics[key] = float(value)
        except ValueError:
            metrics[key] = value
    return metrics


def run_train(args, work: Path, name: str) -> dict[str, Any]:
    wall, output = timed_command([*SDTUNE, "train", args.job, *as_set_options(settings(args, work, name))], "train")
    report = printed_metrics(output)
    phases = {phase: report[f"time/{phase}"] for phase in PHASES if f"time/{phase}" in report}
    return {"wall_s": wall, "tokens_per_s": report["tokens_per_s"], "step": report["step"], "phases_s": phases}


def run_sweep(args, work: Path, name: str) -> dict[str, Any]:
    from pipeline.results.outcomes import load_trials, sweep_spec

    values = [*settings(args, work, name), "search.space={}", "search.num_samples=1"]
    wall, _ = timed_command([*SDTUNE, "sweep", args.job, *as_set_options(values)], "sweep")
    [trial] = load_trials(sweep_spec(work / "runs" / name))
    metrics = trial.metrics
    return {
        "wall_s": wall,
        "tokens_per_s": metrics["tokens_per_s"],
        "step": metrics["step"],
        "trial_cost_s": trial.cost,
    }


def one_round(args, work: Path, number: int) -> dict[str, Any]:
    result = {"round": number, "bare": run_bare(args, work, f"bare-{number}")}
    runners = {"train": run_train, "sweep": run_sweep}
    for mode in args.modes:
        run = runners[mode](args, work, f"{mode}-{number}")
        run["vs_bare_tokens_per_s"] = run["tokens_per_s"] / result["bare"]["tokens_per_s"]
        run["wall_s_over_bare"] = run["wall_s"] - result["bare"]["wall_s"]
        result[mode] = run
    return result


def round_line(result: dict[str, Any]) -> str:
    bare = result["bare"]
    parts = [f"round {result['round']}: bare {bare['tokens_per_s']:,.0f} tokens/s, {bare['wall_s']:.1f} s"]
    for mode in MODES:
        if mode in result:
            run = result[mode]
            parts.append(
                f"{mode} {run['tokens_per_s']:,.0f} tokens/s ({run['vs_bare_tokens_per_s']:.3f}x bare), "
                f"{run['wall_s']:.1f} s (+{run['wall_s_over_bare']:.1f} s)"
            )
    return " | ".join(parts)


def summary(results: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    figures = {
        "bare": {
            "tokens_per_s": spread([r["bare"]["tokens_per_s"] for r in results]),
            "wall_s": spread([r["bare"]["wall_s"] for r in results]),
        }
    }
    for mode in modes:
        figures[mode] = {
            key: spread([r[mode][key] for r in results])
            for key in ("tokens_per_s", "vs_bare_tokens_per_s", "wall_s", "wall_s_over_bare")
        }
    return figures


def print_summary(figures: dict[str, Any]) -> None:
    print(f"bare:  tokens/s {quartile_text(figures['bare']['tokens_per_s'], digits=0)}")
    print(f"       wall {quartile_text(figures['bare']['wall_s'], ' s', 1)}")
    for mode in MODES:
        if mode in figures:
            f = figures[mode]
            print(f"{mode}: tokens/s / bare's {quartile_text(f['vs_bare_tokens_per_s'])}")
            print(f"       tokens/s {quartile_text(f['tokens_per_s'], digits=0)}")
            print(f"       wall {quartile_text(f['wall_s'], ' s', 1)}")
            print(f"       wall - bare's {quartile_text(f['wall_s_over_bare'], ' s', 1)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default=JOB, help="the job spec every run trains (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="the trials to time")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1200, help="rows of the long-sequence file")
    parser.add_argument("--length", type=int, default=1020, help="pixel tokens per row")
    parser.add_argument("--quick", action="store_true", help="a tiny shape on the CPU, 2 rounds, short rows")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applies to every run")
    parser.add_argument("--bare", metavar="JOB", help="run the bare loop of JOB once, in this process")
    parser.add_argument("--out", help="write every round and the summary here (JSON)")
    args = parser.parse_args()
    if args.bare:
        print(BARE_LINE + json.dumps(bare_loop(args.bare, args.overrides)), flush=True)
        return
    if args.quick:
        args.rounds, args.rows, args.length = min(args.rounds, 2), 128, 60
    warm_up_imports()
    results = []
    with tempfile.TemporaryDirectory(prefix="trial-speed-") as tmp:
        work = Path(tmp)
        write_rows(str(work / "long.jsonl"), args.rows, args.length)
        for number in range(1, args.rounds + 1):
            results.append(one_round(args, work, number))
            print(round_line(results[-1]), flush=True)
    figures = summary(results, args.modes)
    print_summary(figures)
    if args.out:
        device = results[0]["bare"]["device"]
        record = {"device": device, "job": args.job, "rounds": results, "summary": figures}
        write_json(args.out, {**header("trial_speed"), **record})


if __name__ == "__main__":
    main()
