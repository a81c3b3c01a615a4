"""Where a sweep's GPU time went, from its directory: per trial and in total, and the gaps between trials.

    python bench/sweep_cost.py runs/quickstart [--json cost.json]

Reads the cost records the sweep driver writes per trial (``<sweep dir>/trial-<id>/cost.json``, see
:func:`pipeline.results.costs.trial_cost`): the time before a trial's worker group was placed (queued, not GPU
time: its Ray processes starting, a staged trial's wait for a GPU), start-up (placement to first training step, warmup
excluded), warmup, training, evaluation, checkpointing, teardown (last report to the trial's end) and what none of
them covers. ``sdtune report`` prints the same table.

When trials run one at a time, two more figures: the gap, from one trial's end to the next one's placement (the
GPU held by nobody; negative when a staged trial was placed before Tune saw the other end), and the GPU's idle
time between trials, from one trial's last report to the next one's first training step (warmup excluded): what a
sequential sweep loses per trial to Ray, imports and set-up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

from pipeline.results.costs import TRIAL_PARTS, cost_table, cost_totals, driver_runs
from pipeline.results.outcomes import load_trials, sweep_spec


def began(cost: dict) -> float:
    """When the trial's GPU time began: its placement (records of before ``began_at``: its start)."""
    return cost.get("began_at", cost["started_at"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    spec = sweep_spec(args.run_dir)
    trials, runs = [t for t in load_trials(spec) if t.cost], driver_runs(spec.sweep_dir)
    print(cost_table(trials, runs))
    ordered = sorted(trials, key=lambda t: began(t.cost))
    pairs = list(itertools.pairwise(ordered))
    gaps = [began(b.cost) - a.cost["ended_at"] for a, b in pairs]
    startups = [t.cost["startup"] for t in trials if "startup" in t.cost]
    summary = {
        "trials": len(trials),
        "totals": cost_totals(trials, runs),
        "startup_s": {"mean": statistics.mean(startups), "max": max(startups)} if startups else None,
        "queued_s": [t.cost.get("queued", 0.0) for t in ordered],
        "teardown_plus_gap_s": [t.cost.get("teardown", 0.0) + gap for t, gap in zip(ordered, gaps)],
        "gaps_s": gaps,
        "idle_between_s": [
            began(b.cost) + b.cost["startup"] - a.cost["last_report_at"]
            for a, b in pairs
            if "last_report_at" in a.cost and "startup" in b.cost
        ],
    }
    if startups:
        print(
            f"\nstart-up per trial: mean {summary['startup_s']['mean']:.1f} s, max {summary['startup_s']['max']:.1f} s"
        )
        for part in ("startup_ray", "startup_tune", "startup_train", "startup_imports", "startup_setup"):
            values = [t.cost[part] for t in trials if part in t.cost]
            summary[f"{part}_s"] = statistics.mean(values) if values else None
            if values:
                print(f"  {part}: mean {statistics.mean(values):.1f} s")
    if any(summary["queued_s"]):
        print("queued, Tune's start to the placement: " + ", ".join(f"{s:.1f}" for s in summary["queued_s"]) + " s")
    if gaps:
        print("last report to the next trial's placement (teardown + gap): "
              + ", ".join(f"{s:.1f}" for s in summary["teardown_plus_gap_s"]) + " s")  # fmt: skip
    if summary["idle_between_s"]:
        print("GPU idle between trials, last report to the next one's first step: "
              + ", ".join(f"{s:.1f}" for s in summary["idle_between_s"]) + " s")  # fmt: skip
    totals = summary["totals"]
    print("share of the trials' wall time: " + ", ".join(f"{p} {totals[p] / totals['wall']:.0%}" for p in TRIAL_PARTS))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=2)


if __name__ == "__main__":
    main()
