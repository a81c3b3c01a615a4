"""What early stopping and shared warmups save: one search space swept twice, once as a plain grid (FIFO, every
trial computes its own SDT warmup) and once under ASHA with shared warmups, and for each the GPU-seconds the
trials held and the best validation metric found.

    python bench/early_stopping.py bench/early_stopping.yaml --out early_stopping.json [--set key=value ...]

GPU-seconds are each trial's wall time (its worker group's placement to its end, from its ``cost.json``) times the
GPUs it held, summed; also counted from Tune's start of each trial (which charges the start of its Ray processes,
before it held a GPU: sdtune's accounting until it read every trial's placement); and the sweep's own wall time.
The two sweeps run one after the other under the same names with a suffix (``<name>-grid``, ``<name>-asha``);
anything given with ``--set`` applies to both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from pipeline.results.outcomes import best_trial, load_trials, sweep_spec
from pipeline.spec.job import load_job

ARMS = {
    "grid": ["search.scheduler=fifo", "search.share_warmup=false"],
    "asha": ["search.scheduler=asha", "search.share_warmup=true"],
}


def run_arm(job: str, arm: str, overrides: list[str]) -> dict:
    name = f"{load_job(job).name}-{arm}"
    settings = [f"name={name}", *overrides, *ARMS[arm]]
    command = [
        sys.executable,
        "-m",
        "pipeline.cli.commands",
        "sweep",
        job,
        *(arg for s in settings for arg in ("--set", s)),
    ]
    began = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - began
    spec = load_job(job, settings)
    trials = load_trials(sweep_spec(spec.sweep_dir))
    best = best_trial(spec, trials)
    costs = [t.cost for t in trials if t.cost]
    return {
        "arm": arm,
        "sweep_wall_s": wall,
        "trials": len(trials),
        "trials_with_cost": len(costs),
        "gpu_seconds": sum(c["wall"] * c["gpus"] for c in costs),
        "gpu_seconds_from_tune_start": sum((c["ended_at"] - c["started_at"]) * c["gpus"] for c in costs),
        "trial_seconds": sum(c["wall"] for c in costs),
        "epochs_trained": sum(int(t.metrics.get("epoch", 0)) for t in trials),
        "best_metric": best.score(spec.search.metric),
        "best_trial": best.config,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applies to both sweeps")
    parser.add_argument("--out", help="write the numbers here (JSON)")
    args = parser.parse_args()
    results = {arm: run_arm(args.job, arm, args.overrides) for arm in ARMS}
    grid, asha = results["grid"], results["asha"]
    print(
        "| sweep | trials | epochs trained | GPU-seconds | from Tune's start | sweep wall s | best validation metric |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in (grid, asha):
        print(
            f"| {r['arm']} | {r['trials']} | {r['epochs_trained']} | {r['gpu_seconds']:.1f} "
            f"| {r['gpu_seconds_from_tune_start']:.1f} | {r['sweep_wall_s']:.0f} | {r['best_metric']:.4f} |"
        )
    ratio = asha["gpu_seconds"] / grid["gpu_seconds"]
    from_start = asha["gpu_seconds_from_tune_start"] / grid["gpu_seconds_from_tune_start"]
    gap = (asha["best_metric"] - grid["best_metric"]) * 100
    print(
        f"ASHA / grid GPU-seconds: {ratio:.3f} (from Tune's start: {from_start:.3f}); "
        f"best metric ASHA - grid: {gap:+.2f} points"
    )
    if args.out:
        with open(args.out, "w") as file:
            summary = {"gpu_seconds_ratio": ratio, "gpu_seconds_from_tune_start_ratio": from_start}
            json.dump({**results, **summary, "best_metric_gap_points": gap}, file, indent=2)


if __name__ == "__main__":
    main()
