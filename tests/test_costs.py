"""Where a sweep's GPU time went (pipeline/results/costs.py), on a synthetic timeline whose every part is worked out
by hand below: four trials on a 2-GPU machine in one run of the sweep driver, one of them with a placement Ray did
not record and one whose parts overlap (a negative rest). The report shows it, and logs it to the parent run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.results.costs import (
    TRIAL_PARTS,
    cost_table,
    cost_totals,
    driver_runs,
    record_driver_run,
    sweep_idle,
    trial_cost,
)
from pipeline.results.outcomes import TrialOutcome
from pipeline.results.report import write_report
from pipeline.results.tracking import SweepTracker
from pipeline.spec.job import parse_job

pytestmark = pytest.mark.usefixtures("clean_cwd")

# One driver run from t=1000 to t=1200 holding 2 GPUs; each trial holds 1. Per trial: Tune's start, the placement
# (None: Ray did not record it), the end, and the worker's report: when its training function began, its phase
# seconds, and of the warmup's and the training's, the seconds spent on pad positions.
RUN = {"started_at": 1000.0, "ended_at": 1200.0, "capacity": 2.0}
TIMELINE = {
    # queued 10; wall 110 = startup 10 (3 to the worker, imports 5, setup 2) + warmup 15 + training 45 + padding 20
    # (5 of the warmup's 20 s, 15 of the training's 60 s) + evaluation 8 + checkpointing 4 + teardown 5 + other 3
    "a": (1010.0, 1020.0, 1130.0, {"time/worker_start": 1023.0, "time/imports": 5.0, "time/setup": 2.0,
                                   "time/warmup": 20.0, "time/warmup_padding": 5.0, "time/train": 60.0,
                                   "time/train_padding": 15.0, "time/eval": 8.0, "time/checkpoint": 4.0,
                                   "time/report_at": 1125.0}),
    # queued 10; wall 75 = startup 7 + training 50 + evaluation 6 + checkpointing 3 + teardown 5 + other 4
    "b": (1015.0, 1025.0, 1100.0, {"time/worker_start": 1027.0, "time/imports": 4.0, "time/setup": 1.0,
                                   "time/train": 50.0, "time/eval": 6.0, "time/checkpoint": 3.0,
                                   "time/report_at": 1095.0}),
    # placement unknown: its GPU time counts from Tune's start; wall 69 = startup 7 + training 40 + evaluation 5 +
    # checkpointing 2 + teardown 10 + other 5
    "c": (1101.0, None, 1170.0, {"time/worker_start": 1104.0, "time/imports": 3.0, "time/setup": 1.0,
                                 "time/train": 40.0, "time/eval": 5.0, "time/checkpoint": 2.0,
                                 "time/report_at": 1160.0}),
    # wall 47, but its parts add up to 51 (startup 4 + training 30 + evaluation 10 + checkpointing 5 + teardown 2):
    # other -4
    "d": (1132.0, 1135.0, 1182.0, {"time/worker_start": 1136.0, "time/imports": 2.0, "time/setup": 1.0,
                                   "time/train": 30.0, "time/eval": 10.0, "time/checkpoint": 5.0,
                                   "time/report_at": 1180.0}),
}  # fmt: skip
EXPECTED_PARTS = {
    "a": {"startup": 10, "warmup": 15, "training": 45, "padding": 20, "evaluation": 8, "checkpointing": 4,
          "teardown": 5, "other": 3},
    "b": {"startup": 7, "warmup": 0, "training": 50, "padding": 0, "evaluation": 6, "checkpointing": 3,
          "teardown": 5, "other": 4},
    "c": {"startup": 7, "warmup": 0, "training": 40, "padding": 0, "evaluation": 5, "checkpointing": 2,
          "teardown": 10, "other": 5},
    "d": {"startup": 4, "warmup": 0, "training": 30, "padding": 0, "evaluation": 10, "checkpointing": 5,
          "teardown": 2, "other": -4},
}  # fmt: skip
# The trials hold 110 + 75 + 69 + 47 = 301 GPU-s. From the first placement (1020) to the last end (1182), 162 s on 2
# GPUs, 324 GPU-s, of which no trial held 23: idle between trials. Before 1020 and after 1182, 20 + 18 s on 2 GPUs:
# 76 GPU-s reserved but unused. 301 + 23 + 76 = 400 = 2 GPUs over the run's 200 s.
EXPECTED_TOTALS = {"startup": 28, "warmup": 15, "training": 165, "padding": 20, "evaluation": 29,
                   "checkpointing": 14, "teardown": 22, "other": 8, "wall": 301, "idle": 23, "unused": 76,
                   "all": 400, "queued": 23, "outside_runs": 0}  # fmt: skip


def costs() -> dict[str, dict]:
    return {name: trial_cost(start, end, report, gpus=1.0, placed=placed)
            for name, (start, placed, end, report) in TIMELINE.items()}  # fmt: skip


def outcomes(spec) -> list[TrialOutcome]:
    config = {"training.lr": 1e-3}
    metrics = {"eval/accuracy": 0.5, "epoch": 2, "step": 20}
    blank = TrialOutcome("", "TERMINATED", config, metrics, spec.with_overrides(config))
    return [replace(blank, trial_id=name, cost=cost) for name, cost in costs().items()]


def test_each_trials_parts_are_its_measured_phases_and_the_rest_is_other():
    for name, cost in costs().items():
        assert {part: cost[part] for part in TRIAL_PARTS} == pytest.approx(EXPECTED_PARTS[name]), name
    a, c = costs()["a"], costs()["c"]
    assert (a["queued"], a["wall"], a["began_at"], a["placement_known"]) == (10.0, 110.0, 1020.0, True)
    assert (c["queued"], c["wall"], c["began_at"], c["placement_known"]) == (0.0, 69.0, 1101.0, False)


def test_every_gpu_second_of_the_run_is_in_one_part():
    [run] = sweep_idle([RUN], list(costs().values()))
    assert run == pytest.approx({"reserved": 400, "held": 301, "idle": 23, "unused": 76})
    spec = parse_job({"name": "costs", "model": {"builtin": "digits"}})
    assert cost_totals(outcomes(spec), [RUN]) == pytest.approx(EXPECTED_TOTALS)


def test_a_restarted_worker_groups_failed_attempt_is_other_time():
    """The trial's GPU time begins at its first worker group's placement; the report is the restarted group's, which
    says when that group was placed and splits its own start-up; the failed attempt between the two placements is
    in no measured part."""
    start, placed, end, report = TIMELINE["a"]
    restarted = trial_cost(start, end, {**report, "time/placed": placed}, gpus=1.0, placed=placed - 8.0)
    # wall 1130 - 1012 = 118: the same parts as before (107 s), and 3 + 8 s of other
    assert (restarted["wall"], restarted["startup"], restarted["other"]) == pytest.approx((118.0, 10.0, 11.0))


def test_trials_of_an_unrecorded_driver_run_are_counted_apart():
    spec = parse_job({"name": "costs", "model": {"builtin": "digits"}})
    trials = outcomes(spec)
    late = replace(trials[1], trial_id="e", cost={**trials[1].cost, "started_at": 1300.0})  # a run left no record
    totals = cost_totals([*trials, late], [RUN])
    assert (totals["outside_runs"], totals["idle"], totals["all"]) == pytest.approx((75.0, 23.0, 475.0))
    assert "e ran in a driver run that left no record" in cost_table([*trials, late], [RUN])


def test_the_driver_runs_are_recorded_one_after_another(tmp_path):
    assert driver_runs(tmp_path) == []
    record_driver_run(tmp_path, 1000.0, 1200.0, 2.0)
    record_driver_run(tmp_path, 1300.0, 1400.0, 2.0)
    assert driver_runs(tmp_path) == [RUN, {"started_at": 1300.0, "ended_at": 1400.0, "capacity": 2.0}]


def test_the_report_shows_every_part_the_rest_and_what_is_unknown(tmp_path, store):
    spec = parse_job({"name": "costs", "output_dir": str(tmp_path / "runs"), "model": {"builtin": "digits"},
                      "search": {"metric": "eval/accuracy", "space": {"training.lr": {"grid": [1e-3]}}},
                      "tracking": {"uri": store}})  # fmt: skip
    spec.sweep_dir.mkdir(parents=True)
    record_driver_run(spec.sweep_dir, RUN["started_at"], RUN["ended_at"], RUN["capacity"])
    tracker = SweepTracker(spec)
    parent = tracker.start_sweep()

    folder = write_report(spec, outcomes(spec), tracker, log=lambda _: None)

    summary = (folder / "summary.md").read_text()
    assert "| driver run 1 | no trial | 2 |" in summary and "| 23.0 | 76.0 |" in summary
    # each part's share of the 400 GPU-s: training 165 (41%), padding 20 (5%), idle 23 (6%), unused 76 (19%)
    assert "| **total (GPU-s)** |  |  |  | 301 | 28 (7%) | 15 (4%) | 165 (41%) | 20 (5%) |" in summary
    assert "| 8 (2%) | 23 (6%) | 76 (19%) |" in summary
    assert "Unattributed (other): 8.0 GPU-s, 2% of all the GPU time" in summary
    assert "Negative rests, where parts counted the same seconds twice: d -4.0 s." in summary
    assert "Ray did not record when the worker groups of c were placed" in summary
    assert (folder / "time.png").read_bytes().startswith(b"\x89PNG")
    logged = tracker.client.get_run(parent).data.metrics
    assert logged["cost/total_idle_s"] == pytest.approx(23.0) and logged["cost/total_all_s"] == pytest.approx(400.0)
    assert logged["cost/other_fraction"] == pytest.approx(8 / 400)
