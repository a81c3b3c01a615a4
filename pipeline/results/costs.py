"""Where a sweep's GPU time went: every GPU-second the sweep held, in parts that add up to it.

Each run of the sweep's driver (``sdtune sweep``, ``sdtune resume``) holds GPUs from the start of its Tune
experiment to its end (Ray's start before it, and the export and report after it, are not counted): the cluster's
GPUs when sdtune started the Ray instance itself (the machine is the sweep's), else as many as its concurrent
trials hold (:func:`reserved_gpus`). That time is split into

- each trial's time from its worker group's placement to its end (:func:`trial_cost`, weighted by the GPUs it
  held): ``startup``, ``warmup``, ``training``, ``padding``, ``evaluation``, ``checkpointing``, ``teardown`` and
  ``other``;
- the rest of the GPU time of each driver run (:func:`sweep_idle`): ``idle`` between trials (from the first
  trial's placement to the last trial's end, GPUs that no trial held: between one trial and the next, or left empty
  while fewer trials ran than fit) and ``unused`` (before the first placement and after the last trial: Ray and
  Tune starting, the sweep winding down).

``other`` is the one part not measured on its own: a trial's wall time less its measured parts. It is shown with
its size, and never clamped: a negative rest means two parts counted the same seconds, a bug to see. A CPU sweep
counts plain seconds, each trial as one unit of capacity (its driver run holds ``max_concurrent_trials`` of them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.results.arms import arm_of
from pipeline.results.outcomes import TrialOutcome
from pipeline.storage.layout import DRIVER_RUNS_FILE
from pipeline.storage.paths import StoragePath, write_file

# The parts of one trial's wall time, in the order a trial goes through them.
TRIAL_PARTS = ("startup", "warmup", "training", "padding", "evaluation", "checkpointing", "teardown", "other")
# The parts of a driver run's GPU time that no trial held.
SWEEP_PARTS = ("idle", "unused")
PART_NAMES = {"idle": "idle between trials", "unused": "reserved, unused", "other": "other (the rest)"}


def trial_cost(
    started: float, ended: float, report: Mapping[str, Any], gpus: float, placed: float | None = None
) -> dict[str, Any]:
    """Where the wall time of one trial run (``started`` to ``ended``, epoch seconds) went, in seconds:

    - ``queued``: from Tune's start of the trial to its worker group's placement (``placed``, else the report's
      ``time/placed``): its Ray processes starting and, for a staged trial, its wait for a running trial's GPUs. The
      trial held no GPU then: not in its ``wall``. Its GPU time begins at the placement (``began_at``); where Ray
      did not record the placement (``placement_known`` false), at Tune's start of the trial;
    - ``startup``: from then to its first step, warmup excluded: ``startup_ray`` (Ray Train's worker group, up to the
      worker's training function; where the placement is unknown, from the trial's start, of which
      ``startup_tune``, up to the trial's Tune function, and ``startup_train``, the rest), ``startup_imports``,
      ``startup_setup`` (model and data loading, the adapters, the DeepSpeed engine);
    - ``warmup``, ``training``, ``evaluation``, ``checkpointing`` (all but the last report's): as the worker measured
      them, up to its last report, less ``padding``: the share of the warmup's and the training steps' time that
      went to pad positions (a step costs in proportion to its positions; evaluation keeps its own padding);
    - ``teardown``: from the last report to the trial's end (its checkpoint, the worker group's shutdown);
    - ``other``: the wall time none of these covers, measured as the rest (a failed attempt of a worker group that
      Ray Train restarted; negative where parts overlap).

    ``gpus`` is what the trial held: its GPU-seconds are these seconds times ``gpus``. ``placed``: the first
    placement of the trial's worker groups, where Ray Train restarted one (the report is the last group's).
    """
    known = placed if placed is not None else report.get("time/placed")
    began = max(started, known or started)
    reporting_group = max(began, report.get("time/placed", began))  # later than ``began`` in a restarted trial
    until_worker = report["time/worker_start"] - reporting_group
    warmup_padding, train_padding = report.get("time/warmup_padding", 0.0), report.get("time/train_padding", 0.0)
    parts = {
        "startup": until_worker + report.get("time/imports", 0.0) + report.get("time/setup", 0.0),
        "warmup": report.get("time/warmup", 0.0) - warmup_padding,
        "training": report.get("time/train", 0.0) - train_padding,
        "padding": warmup_padding + train_padding,
        "evaluation": report.get("time/eval", 0.0),
        "checkpointing": report.get("time/checkpoint", 0.0),
        "teardown": ended - report["time/report_at"],
    }
    parts["other"] = ended - began - sum(parts.values())
    startup = {
        "startup_ray": until_worker,
        "startup_imports": report.get("time/imports", 0.0),
        "startup_setup": report.get("time/setup", 0.0),
    }
    if "time/driver_start" in report and began == started:
        startup["startup_tune"] = report["time/driver_start"] - started
        startup["startup_train"] = report["time/worker_start"] - report["time/driver_start"]
    moments = {"started_at": started, "began_at": began, "last_report_at": report["time/report_at"], "ended_at": ended}
    held = {"queued": began - started, "wall": ended - began, "gpus": gpus, "placement_known": known is not None}
    return {**moments, **held, **parts, **startup}


def unreported_cost(started: float, ended: float, gpus: float) -> dict[str, Any]:
    """The cost of a trial run that ended before its first report: its wall time is all ``other``."""
    return {"started_at": started, "began_at": started, "ended_at": ended, "wall": ended - started, "gpus": gpus,
            "placement_known": False, "other": ended - started}  # fmt: skip


# -- the driver's runs ----------------------------------------------------------------------------------------


def reserved_gpus(cluster_gpus: float, local_cluster: bool, trials_at_once: int, gpus_per_trial: float) -> float:
    """The capacity a driver run holds: on a Ray instance sdtune started, the cluster's GPUs (the machine is the
    sweep's); on one it connected to, the GPUs of the trials it runs at once. A CPU sweep: one unit per trial."""
    if gpus_per_trial <= 0:
        return float(trials_at_once)
    return cluster_gpus if local_cluster else min(cluster_gpus, trials_at_once * gpus_per_trial)


def record_driver_run(sweep_dir: StoragePath, started: float, ended: float, capacity: float) -> None:
    """Adds one run of the sweep driver (its start, end and capacity) to ``<sweep dir>/driver-runs.json``."""
    runs = [*driver_runs(sweep_dir), {"started_at": started, "ended_at": ended, "capacity": capacity}]
    write_file(sweep_dir.resolve() / DRIVER_RUNS_FILE, json.dumps(runs, indent=2) + "\n")


def driver_runs(sweep_dir: StoragePath) -> list[dict[str, float]]:
    """The recorded runs of the sweep driver (none for a sweep from before they were recorded)."""
    path = sweep_dir.resolve() / DRIVER_RUNS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def run_of(cost: Mapping[str, Any], runs: Sequence[Mapping[str, float]]) -> int | None:
    """The index of the driver run a trial run started in, or None where that run left no record."""
    for index, run in enumerate(runs):
        if run["started_at"] <= cost["started_at"] <= run["ended_at"]:
            return index
    return None


def weight(cost: Mapping[str, Any]) -> float:
    """What one second of the trial counts: its GPUs, or 1 for a trial that held none."""
    return cost["gpus"] or 1.0


def sweep_idle(runs: Sequence[Mapping[str, float]], costs: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Per driver run: ``reserved`` (its capacity times its duration), ``held`` (its trials' weighted wall time),
    ``idle`` and ``unused`` (see the module docstring), with ``reserved == held + idle + unused``. ``idle`` is
    negative where the trials held more than the capacity at once (a wrong capacity): shown, not clamped."""
    result = []
    for index, run in enumerate(runs):
        mine = [cost for cost in costs if run_of(cost, runs) == index]
        duration = run["ended_at"] - run["started_at"]
        held = sum(weight(cost) * cost["wall"] for cost in mine)
        if mine:
            first, last = min(cost["began_at"] for cost in mine), max(cost["ended_at"] for cost in mine)
            span = last - first
        else:
            span = 0.0
        idle = run["capacity"] * span - held
        unused = run["capacity"] * (duration - span)
        result.append({"reserved": run["capacity"] * duration, "held": held, "idle": idle, "unused": unused})
    return result


# -- totals and the report's table ----------------------------------------------------------------------------


def cost_totals(trials: Sequence[TrialOutcome], runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Weighted seconds (GPU-seconds; plain seconds for a CPU sweep) per part over the trials with a cost record and
    the recorded driver runs, and: ``wall``, the trials' weighted wall time; ``all``, all the GPU time accounted
    for (the trials' and the runs' idle and unused: the runs' reserved time, plus trials of unrecorded runs);
    ``outside_runs``, the trials' weighted wall time in driver runs without a record; ``queued``, the seconds
    before the trials' placements (plain seconds: no GPU was theirs then)."""
    costs = [trial.cost for trial in trials if trial.cost]
    totals = {part: sum(cost.get(part, 0.0) * weight(cost) for cost in costs) for part in TRIAL_PARTS}
    totals["wall"] = sum(cost["wall"] * weight(cost) for cost in costs)
    idle = sweep_idle(runs, costs)
    for part in SWEEP_PARTS:
        totals[part] = sum(run[part] for run in idle)
    totals["all"] = totals["wall"] + totals["idle"] + totals["unused"]
    totals["outside_runs"] = sum(cost["wall"] * weight(cost) for cost in costs if run_of(cost, runs) is None)
    totals["queued"] = sum(cost.get("queued", 0.0) for cost in costs)
    return totals


def cost_table(trials: Sequence[TrialOutcome], runs: Sequence[Mapping[str, float]]) -> str:
    """One row per trial with a cost record, one per recorded driver run (its GPU time no trial held), a total row
    with each part's share of all the GPU time, and notes: the size of the unattributed rest, negative rests,
    trials whose placement Ray did not record, trials of unrecorded driver runs."""
    recorded = [trial for trial in trials if trial.cost]
    if not recorded:
        return "No trial of this sweep has a cost record (the sweep driver writes one per trial as it ends)."
    unit = "GPU-s" if any(trial.cost["gpus"] for trial in recorded) else "s"
    parts = [*TRIAL_PARTS, *SWEEP_PARTS]
    header = ["", "arm", "GPUs", "queued s", "wall s", *(f"{PART_NAMES.get(part, part)} s" for part in parts)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial in recorded:
        cost = trial.cost
        head = [trial.trial_id, arm_of(trial).label, f"{cost['gpus']:g}", f"{cost.get('queued', 0.0):.1f}"]
        cells = [f"{cost['wall']:.1f}", *(f"{cost.get(part, 0.0):.1f}" for part in TRIAL_PARTS), "", ""]
        lines.append("| " + " | ".join(head + cells) + " |")
    for number, (run, idle) in enumerate(zip(runs, sweep_idle(runs, [t.cost for t in recorded])), start=1):
        cells = [f"driver run {number}", "no trial", f"{run['capacity']:g}", "", "", *[""] * len(TRIAL_PARTS)]
        lines.append("| " + " | ".join([*cells, f"{idle['idle']:.1f}", f"{idle['unused']:.1f}"]) + " |")
    totals = cost_totals(recorded, runs)
    shares = [f"{totals[part]:.0f} ({share(totals[part], totals['all'])})" for part in parts]
    lines.append("| " + " | ".join([f"**total ({unit})**", "", "", "", f"{totals['wall']:.0f}", *shares]) + " |")
    return "\n".join(lines) + "\n\n" + cost_notes(recorded, runs, totals, unit)


def share(part: float, total: float) -> str:
    return f"{part / total:.0%}" if total else "–"


def cost_notes(
    recorded: Sequence[TrialOutcome], runs: Sequence[Mapping[str, float]], totals: Mapping[str, float], unit: str
) -> str:
    """What the table cannot say by itself, one line each."""
    notes = [
        f"- Unattributed (other): {totals['other']:.1f} {unit}, {share(totals['other'], totals['all'])} of all "
        "the GPU time: each trial's wall time less its measured parts."
    ]
    negative = [f"{t.trial_id} {t.cost['other']:.1f} s" for t in recorded if t.cost.get("other", 0.0) < 0]
    if negative:
        notes.append(f"- Negative rests, where parts counted the same seconds twice: {', '.join(negative)}.")
    unknown = [t.trial_id for t in recorded if not t.cost.get("placement_known", True)]
    if unknown:
        notes.append(
            f"- Ray did not record when the worker groups of {', '.join(unknown)} were placed: their start-up counts "
            "from Tune's start of the trial, its queue included."
        )
    if not runs:
        notes.append("- No run of the sweep driver is recorded: the GPU time between and around trials is unknown.")
        return "\n".join(notes)
    notes += [
        "- Idle between trials: the GPUs a driver run held from its first trial's placement to its last trial's end "
        "that no trial held.",
        "- Reserved, unused: what it held before and after that (Ray and Tune starting, the sweep winding down). A run "
        "holds the cluster's GPUs on a Ray instance sdtune started, else its concurrent trials' GPUs.",
    ]
    if totals["outside_runs"]:
        outside = [t.trial_id for t in recorded if run_of(t.cost, runs) is None]
        notes.append(
            f"- {', '.join(outside)} ran in a driver run that left no record (killed?): the GPU time no trial held "
            "then is unknown."
        )
    return "\n".join(notes)


__all__ = ["SWEEP_PARTS", "TRIAL_PARTS", "cost_table", "cost_totals", "driver_runs", "sweep_idle", "trial_cost"]
