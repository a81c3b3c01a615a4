"""Where a sweep's GPU time went, from its directory: per trial and in total, and the gaps between trials.

    python bench/sweep_cost.py runs/quickstart [--json cost.json]

Reads the cost records the sweep driver writes per trial (``<sweep dir>/trial-<id>/cost.json``, see
:func:`pipeline.results.trial_cost`): start-up (placement to first training step, warmup excluded), warmup,
training, evaluation, checkpointing, teardown (last report to the trial's end) and what none of them covers. A
gap is the time between one trial's end and the next trial's start when trials run one at a time: the GPU is
held by nobody then. ``sdtune report`` prints the same table.
"""

from __future__ import annotations

import argparse
import json
import statistics

from pipeline.report import cost_table, cost_totals
from pipeline.results import COST_PARTS, load_trials, sweep_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    trials = [t for t in load_trials(sweep_spec(args.run_dir)) if t.cost]
    print(cost_table(trials))
    ordered = sorted(trials, key=lambda t: t.cost["started_at"])
    gaps = [b.cost["started_at"] - a.cost["ended_at"] for a, b in zip(ordered, ordered[1:])]
    startups = [t.cost["startup"] for t in trials if "startup" in t.cost]
    summary = {
        "trials": len(trials),
        "totals": cost_totals(trials),
        "startup_s": {"mean": statistics.mean(startups), "max": max(startups)} if startups else None,
        "teardown_plus_gap_s": [t.cost.get("teardown", 0.0) + gap for t, gap in zip(ordered, gaps)],
        "gaps_s": gaps,
    }
    if startups:
        print(f"\nstart-up per trial: mean {summary['startup_s']['mean']:.1f} s, max {summary['startup_s']['max']:.1f} s")
        for part in ("startup_ray", "startup_imports", "startup_setup"):
            values = [t.cost[part] for t in trials if part in t.cost]
            summary[f"{part}_s"] = statistics.mean(values) if values else None
            if values:
                print(f"  {part}: mean {statistics.mean(values):.1f} s")
    if gaps:
        print("last report to the next trial's start (teardown + gap): "
              + ", ".join(f"{s:.1f}" for s in summary["teardown_plus_gap_s"]) + " s")  # fmt: skip
    totals = summary["totals"]
    print("share of the trials' wall time: " + ", ".join(f"{p} {totals[p] / totals['wall']:.0%}" for p in COST_PARTS))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=2)


if __name__ == "__main__":
    main()
