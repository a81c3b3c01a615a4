"""What early stopping and shared warmups save: one search space swept as a plain grid (FIFO, every trial computes its
own SDT warmup) and under ASHA with shared warmups, in ABBA order, several runs of each.

    python bench/early_stopping.py --out early_stopping.json        # bench/early_stopping.yaml, 3 ABBA pairs
    python bench/early_stopping.py --pairs 2 --out pair2.json       # one pair (ASHA, grid) per call, then:
    python bench/early_stopping.py --combine pair1.json pair2.json pair3.json --out early_stopping.json
    python bench/early_stopping.py --quick --out /tmp/es.json       # 4 small trials on the CPU, 2 pairs

The sweeps run as a user runs them (``sdtune sweep JOB``, each a fresh process with its own Ray instance) in the
order grid, ASHA, ASHA, grid, grid, ASHA, ... (ABBA pairs, so that neither arm always runs first, on colder caches or
a fresher host); anything given with ``--set`` applies to every sweep. A pair of sweeps at the default shape takes
about as long as a lent GPU machine's call may run, so ``--pairs`` runs some pairs and ``--combine`` summarises the
runs of several outputs as one.

**GPU-seconds** are what the sweep reserved, from the command's launch to its exit: its slots
(``resources.max_concurrent_trials``) times the GPUs of one trial, whether a trial used them or not. They split into

- *trial-busy*: each trial's GPUs times its warmup, training, evaluation and checkpointing (``cost.json`` of the trial,
  as its worker measured them);
- *held idle*: a trial's GPUs from its worker group's placement to its end, minus the busy part: its start-up
  (Ray Train's worker, imports, set-up), its teardown and whatever its record leaves unaccounted;
- *reserved, no trial*: the slots no trial held: before the first placement (Ray, MLflow), between one trial's end
  and the next one's placement, while fewer trials than slots remain (an ASHA sweep's last trial training alone),
  and after the last trial (export, report).

The first two are the trials' own (placement to end, what earlier versions of this bench counted); the sum of all
three is the reservation. A run on the CPU (no trial uses a GPU) counts one unit per trial instead of its GPUs.

**Time to the grid's best**: the GPU-seconds (and seconds) from a sweep's launch to the first moment at which the
trial it would export, were it stopped then (the best trial by its latest report so far), scores at least the
target: the lowest of the grid runs' best scores, a score every grid run reached. "not reached" where it never did.
Report times are those at which the sweep's MLflow run recorded each validation score. **Best found**: the score of
the trial the sweep exported (the best by its last report).

Printed: every run, then per arm the median and range of each figure, and ASHA's medians against the grid's.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from rounds import SDTUNE, device_name, header, plural, spread, timed_command, warm_up_imports, write_json

JOB = str(Path(__file__).with_name("early_stopping.yaml"))
ARMS = {
    "grid": ["search.scheduler=fifo", "search.share_warmup=false"],
    "asha": ["search.scheduler=asha", "search.share_warmup=true"],
}
BUSY = ("warmup", "training", "evaluation", "checkpointing")  # the parts of a trial's cost record that use its GPUs
# 4 trials of 3 epochs on the CPU, 2 at a time: the same sweeps and accounting, in minutes.
QUICK = [
    "resources.use_gpu=false",
    "resources.trial_cpus=0.25",
    "resources.max_concurrent_trials=2",
    "training.epochs=3",
    "training.batch_size=16",
    "data.max_eval_samples=100",
    "search.space={method.name: {grid: [sdlora, lora]}, training.lr: {grid: [1.0e-2, 3.0e-2]}}",
]


def pair_order(pair: int) -> tuple[str, str]:
    """The arms of ABBA pair ``pair`` (from 1) in the order they run: grid first in odd pairs, ASHA in even ones."""
    return ("grid", "asha") if pair % 2 else ("asha", "grid")


def run_sweep(args, work: Path, arm: str, number: int) -> dict[str, Any]:
    from pipeline.results.outcomes import best_trial, load_trials, sweep_spec

    name = f"early-stopping-{arm}-{number}"
    settings = [f"name={name}", f"output_dir={work}", *(QUICK if args.quick else []), *args.overrides, *ARMS[arm]]
    began = time.time()
    wall, _ = timed_command([*SDTUNE, "sweep", args.job, *(a for s in settings for a in ("--set", s))], name)
    spec = sweep_spec(work / name)
    trials = load_trials(spec)
    best = best_trial(spec, trials)
    return {
        "arm": arm,
        "run": number,
        "mode": spec.search.mode,
        "wall_s": wall,
        **reservation(spec, trials, wall),
        "trials": len(trials),
        "stopped_early": sum(t.stopped_early for t in trials),
        "epochs_trained": sum(int(t.metrics.get("epoch", 0)) for t in trials),
        "best_found": best.score(spec.search.metric),
        "best_trial": best.config,
        "reports": reports(spec, trials, began),
    }


def reservation(spec, trials: list, wall: float) -> dict[str, float]:
    """The sweep's GPU-seconds and their parts (see the module's docstring)."""
    costs = [t.cost for t in trials if t.cost]
    if not costs:
        raise SystemExit(f"{spec.sweep_dir}: no trial has a cost record (cost.json): nothing to account")
    per_trial = max(cost["gpus"] for cost in costs) or 1.0  # the GPUs a trial held; on the CPU, one unit
    slots = spec.resources.max_concurrent_trials
    held = sum(per_trial * cost["wall"] for cost in costs)
    busy = sum(per_trial * cost.get(part, 0.0) for cost in costs for part in BUSY)
    reserved = slots * per_trial * wall
    return {
        "reserved_gpus": slots * per_trial,
        "gpu_s": reserved,
        "trial_busy_gpu_s": busy,
        "held_idle_gpu_s": held - busy,
        "reserved_no_trial_gpu_s": reserved - held,
        "trial_held_gpu_s": held,
        "trials_with_cost": len(costs),
    }


def reports(spec, trials: list, began: float) -> list[list]:
    """Every validation score the sweep recorded, as [seconds after the launch, trial id, score], in time order."""
    from pipeline.results.tracking import SweepTracker, clean_key

    tracker = SweepTracker(spec)
    points = []
    for trial in trials:
        run_id = tracker.find_trial_run(trial.trial_id)
        if run_id is None:
            continue
        for metric in tracker.client.get_metric_history(run_id, clean_key(spec.search.metric)):
            points.append([metric.timestamp / 1000 - began, trial.trial_id, metric.value])
    return sorted(points)


def better(mode: str, a: float, b: float) -> bool:
    """Whether score ``a`` is at least as good as ``b``."""
    return a >= b if mode == "max" else a <= b


def time_to(points: list[list], target: float, mode: str) -> float | None:
    """Seconds after the launch at which the best trial by its latest report first scored at least ``target``."""
    latest: dict[str, float] = {}
    pick = max if mode == "max" else min
    for seconds, trial_id, score in points:
        latest[trial_id] = score
        if better(mode, pick(latest.values()), target):
            return seconds
    return None


def add_time_to_target(runs: list[dict[str, Any]], mode: str) -> float:
    """Each run's time to the grid's best (the worst of the grid runs' best scores); returns that target."""
    grid_bests = [run["best_found"] for run in runs if run["arm"] == "grid"]
    target = min(grid_bests) if mode == "max" else max(grid_bests)
    for run in runs:
        seconds = time_to(run["reports"], target, mode)
        run["to_grid_best_s"] = seconds
        run["to_grid_best_gpu_s"] = None if seconds is None else seconds * run["reserved_gpus"]
    return target


def run_line(run: dict[str, Any]) -> str:
    reached = run["to_grid_best_gpu_s"]
    to_best = "not reached" if reached is None else f"{reached:.1f} GPU-s ({run['to_grid_best_s']:.0f} s)"
    return (
        f"{run['arm']} {run['run']}: {run['gpu_s']:.1f} GPU-s in {run['wall_s']:.0f} s (trial-busy "
        f"{run['trial_busy_gpu_s']:.1f}, held idle {run['held_idle_gpu_s']:.1f}, reserved with no trial "
        f"{run['reserved_no_trial_gpu_s']:.1f}; trials placement to end {run['trial_held_gpu_s']:.1f}) | "
        f"{run['trials']} trials, {run['stopped_early']} stopped early, {run['epochs_trained']} epochs | "
        f"to the grid's best: {to_best} | best found {run['best_found']:.4f}"
    )


FIGURES = (
    "gpu_s",
    "trial_busy_gpu_s",
    "held_idle_gpu_s",
    "reserved_no_trial_gpu_s",
    "trial_held_gpu_s",
    "wall_s",
    "to_grid_best_gpu_s",
    "best_found",
)


def arm_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure: median and range over the arm's runs. A run that never reached the grid's best counts as
    infinitely slow (its median is "not reached" when half the runs or more did not reach it)."""
    summary = {}
    for figure in FIGURES:
        values = [math.inf if run[figure] is None else run[figure] for run in runs]
        summary[figure] = {**spread(values), "not_reached": sum(run[figure] is None for run in runs)}
    return summary


def figure_text(figure: dict[str, Any], digits: int) -> str:
    f = lambda value: "not reached" if math.isinf(value) else f"{value:.{digits}f}"  # noqa: E731
    return f"median {f(figure['median'])} (range {f(figure['min'])}-{f(figure['max'])}, {plural(figure['n'], 'run')})"


def print_summary(summary: dict[str, Any], target: float) -> None:
    print(f"the grid's best (the lowest best score of the grid runs): {target:.4f}")
    for arm, figures in summary.items():
        print(
            f"{arm}: GPU-s {figure_text(figures['gpu_s'], 1)}; to the grid's best "
            f"{figure_text(figures['to_grid_best_gpu_s'], 1)} GPU-s; best found "
            f"{figure_text(figures['best_found'], 4)}"
        )
    grid, asha = summary["grid"], summary["asha"]
    ratios = {figure: asha[figure]["median"] / grid[figure]["median"] for figure in ("gpu_s", "to_grid_best_gpu_s")}
    gap = (asha["best_found"]["median"] - grid["best_found"]["median"]) * 100
    print(
        f"ASHA / grid, medians: GPU-s {ratios['gpu_s']:.3f}, to the grid's best {ratios['to_grid_best_gpu_s']:.3f}; "
        f"best found ASHA - grid {gap:+.2f} points"
    )


def sweeps(args) -> list[dict[str, Any]]:
    """The sweeps of the ABBA pairs asked for (all ``--runs`` pairs unless ``--pairs``), run one after the other."""
    device = device_name()
    runs = []
    with tempfile.TemporaryDirectory(prefix="early-stopping-") as tmp:
        for pair in args.pairs or range(1, args.runs + 1):
            for number, arm in zip((2 * pair - 1, 2 * pair), pair_order(pair)):
                runs.append({**run_sweep(args, Path(tmp), arm, number), "device": device})
                print(
                    f"{arm} {number}: {runs[-1]['gpu_s']:.1f} GPU-s, best found {runs[-1]['best_found']:.4f}",
                    flush=True,
                )
    return runs


def combined(files: list[str]) -> list[dict[str, Any]]:
    """The runs recorded in earlier outputs of this bench, in their order."""
    runs = [run for file in files for run in json.loads(Path(file).read_text())["runs"]]
    return sorted(runs, key=lambda run: run["run"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default=JOB, help="the sweep's job spec (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="sweeps of each arm (ABBA pairs)")
    parser.add_argument(
        "--pairs",
        type=int,
        nargs="+",
        help="only these ABBA pairs (1: grid then ASHA, 2: ASHA then "
        "grid, ...), for machines whose calls are too short for all; then --combine their outputs",
    )
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="run nothing: summarise these outputs' runs")
    parser.add_argument("--quick", action="store_true", help="4 small trials on the CPU, 2 runs of each arm")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applies to every sweep")
    parser.add_argument("--out", help="write every run and the summary here (JSON)")
    args = parser.parse_args()
    if args.quick:
        args.runs = min(args.runs, 2)
    if not args.combine:
        warm_up_imports()
    runs = combined(args.combine) if args.combine else sweeps(args)
    if {run["arm"] for run in runs} != set(ARMS):
        raise SystemExit("the runs hold only one arm: nothing to compare")
    target = add_time_to_target(runs, runs[0]["mode"])
    for run in runs:
        print(run_line(run))
    summary = {arm: arm_summary([run for run in runs if run["arm"] == arm]) for arm in ARMS}
    print_summary(summary, target)
    if args.out:
        record = {"devices": sorted({run["device"] for run in runs}), "job": args.job, "grid_best_target": target}
        write_json(args.out, {**header("early_stopping"), **record, "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
