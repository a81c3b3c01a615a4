"""The sweep report from hand-built trials (no Ray): plots, the best-vs-baselines table at equal budgets and its
MLflow artifacts; an ASHA-stopped arm's history comes from a real MLflow store, as a sweep's runs hold it."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.results.arm_summaries import ArmSummary, Budget, Stats
from pipeline.results.arms import Arm
from pipeline.results.outcomes import TrialOutcome
from pipeline.results.report import write_report
from pipeline.results.tracking import SweepTracker
from pipeline.results.verdicts import baseline_verdicts, method_ranking, sweep_verdicts
from pipeline.spec.job import parse_job

# Every test runs in an empty working directory that must stay empty (no stray ./mlruns).
pytestmark = pytest.mark.usefixtures("clean_cwd")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LORA_R2 = {"name": "lora", "lora_rank": 2, "lora_targets": ["out_proj", "x_proj"]}
LORA_R8 = {"name": "lora", "lora_rank": 8, "lora_targets": ["out_proj", "x_proj"]}
SDLORA = {"name": "sdlora"}

# (method, lr) -> validation and test accuracy of seeds 0, 1, 2. The test accuracy of the settings that lose on
# validation is high on purpose: a report that chose by test would pick them.
VALIDATION = {
    ("lora", 1e-3): [0.70, 0.72, 0.74],
    ("lora", 1e-2): [0.76, 0.78, 0.80],  # lora's best on validation
    ("sdlora", 1e-3): [0.84, 0.86, 0.88],  # sdlora's best on validation
    ("sdlora", 1e-2): [0.85, math.nan, 0.99],  # seed 1 reports NaN, seed 2 fails: 0.85 alone, below 0.86
}
TEST = {
    ("lora", 1e-3): [0.95, 0.95, 0.95],
    ("lora", 1e-2): [0.75, 0.77, 0.79],
    ("sdlora", 1e-3): [0.80, 0.83, 0.86],
    ("sdlora", 1e-2): [0.99, 0.99, 0.99],
}
TRAINABLE = {"lora": 1000, "sdlora": 600}
FAILED_TRIAL = ("sdlora", 1e-2, 2)
FAILURE = "TrialDiverged: diverged: the training loss is nan at optimizer step 7"  # the failed trial's one-line reason


def make_spec(tmp_path: Path, store: str, space: dict):
    return parse_job(
        {
            "name": "report",
            "output_dir": str(tmp_path / "runs"),
            "model": {"builtin": "digits"},
            "training": {"epochs": 2},
            "search": {"metric": "eval/accuracy", "mode": "max", "space": space},
            "tracking": {"uri": store},
        }
    )


def trial(spec, number: int, status: str, config: dict, metrics: dict) -> TrialOutcome:
    last = {"step": 20, "epoch": 2, "train/loss": 0.5, **metrics}
    return TrialOutcome(f"t{number:02d}", status, config, last, spec.with_overrides(config))


def method_lr_seed_trials(spec) -> list[TrialOutcome]:
    trials = []
    for (method, lr), accuracies in VALIDATION.items():
        for seed, accuracy in enumerate(accuracies):
            metrics = {
                "eval/accuracy": accuracy,
                "test/accuracy": TEST[method, lr][seed],
                "trainable_parameters": TRAINABLE[method],
                "tokens_per_s": 100.0 + 10 * seed,
            }
            status = "ERROR" if (method, lr, seed) == FAILED_TRIAL else "TERMINATED"
            config = {"method.name": method, "training.lr": lr, "training.seed": seed}
            outcome = trial(spec, len(trials), status, config, metrics)
            trials.append(replace(outcome, error=FAILURE) if status == "ERROR" else outcome)
    return trials


def read_rows(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "summary.csv").open(newline="") as file:
        return {row["arm"]: row for row in csv.DictReader(file)}


def assert_plots(folder: Path, keys: list[str]) -> None:
    for name in [f"{key}.png" for key in keys] + ["learning_curves.png"]:
        png = (folder / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1000, name


def flat(text: str) -> str:
    """``text`` with its line breaks and runs of spaces as single spaces (the console wraps the verdict)."""
    return " ".join(text.split())


def test_best_setting_per_arm_with_seeds_as_repetitions(tmp_path, store):
    space = {
        "method.name": {"grid": ["lora", "sdlora"]},
        "training.lr": {"grid": [1e-3, 1e-2]},
        "training.seed": {"grid": [0, 1, 2]},
    }
    spec = make_spec(tmp_path, store, space)
    parent = SweepTracker(spec).start_sweep()
    logged: list[str] = []

    folder = write_report(spec, method_lr_seed_trials(spec), SweepTracker(spec), log=logged.append)

    assert folder == spec.sweep_dir.resolve() / "report"
    assert_plots(folder, list(space))
    rows = read_rows(folder)
    assert set(rows) == {"lora", "sdlora"}
    lora, sdlora = rows["lora"], rows["sdlora"]
    # lora: lr 1e-2 wins on validation (0.78 > 0.72), although lr 1e-3 has the better test accuracy.
    assert float(lora["training.lr"]) == 1e-2
    assert float(lora["eval/accuracy mean"]) == pytest.approx(0.78, abs=1e-12)
    assert float(lora["eval/accuracy std"]) == pytest.approx(0.02, abs=1e-12)
    assert float(lora["test/accuracy mean"]) == pytest.approx(0.77, abs=1e-12)
    assert float(lora["test/accuracy std"]) == pytest.approx(0.02, abs=1e-12)
    # sdlora: lr 1e-3 (0.86) wins, since lr 1e-2 counts only seed 0 (0.85): its NaN and failed 0.99 are left out.
    assert float(sdlora["training.lr"]) == 1e-3
    assert float(sdlora["eval/accuracy mean"]) == pytest.approx(0.86, abs=1e-12)
    assert float(sdlora["eval/accuracy std"]) == pytest.approx(0.02, abs=1e-12)
    assert float(sdlora["test/accuracy mean"]) == pytest.approx(0.83, abs=1e-12)
    assert float(sdlora["test/accuracy std"]) == pytest.approx(0.03, abs=1e-12)
    for row, method in ((lora, "lora"), (sdlora, "sdlora")):
        assert row["seeds"] == "3"
        assert float(row["trainable_parameters"]) == TRAINABLE[method]
        assert float(row["tokens_per_s"]) == pytest.approx(110.0)
    assert (sdlora["best"], lora["best"]) == ("True", "False")

    summary = (folder / "summary.md").read_text()
    assert "10 of 12 trials; excluded: 1 failed, 1 without a finite eval/accuracy" in summary
    assert "0 stopped early by the scheduler" in summary
    assert (
        "| **sdlora** (best) | 4 (0) | 0.86 ± 0.02 | training.lr=0.001 | 2 of 2 | 0.86 ± 0.02 | 0.83 ± 0.03 | 600 | "
        "110 | training.lr=0.001 |"
    ) in summary
    pooled = math.sqrt((2 * 0.03**2 + 2 * 0.02**2) / 4)
    verdict = (
        "SDLoRA beats the best LoRA arm (lora) on test/accuracy after the whole training: 0.83 ± 0.03 (n=3) vs "
        f"0.77 ± 0.02 (n=3), a difference of +0.06, {0.06 / pooled:.2g} pooled standard deviations."
    )
    assert verdict in summary
    assert f"## Failed trials\n\n- `t11` (sdlora): {FAILURE}\n" in summary
    assert verdict in flat("\n".join(logged)) and str(folder) in logged[0]
    assert all(len(line) <= 300 for text in logged for line in text.splitlines())

    # trials.csv: every trial, the failed and NaN ones too, with its status and numbers
    with (folder / "trials.csv").open(newline="") as file:
        listed = list(csv.DictReader(file))
    assert len(listed) == 12 and [row["error"] for row in listed if row["status"] == "ERROR"] == [FAILURE]
    assert all(row["error"] == "" for row in listed if row["status"] != "ERROR")
    first = listed[0]
    assert (first["method.name"], float(first["eval/accuracy"]), float(first["tokens_per_s"])) == (
        "lora",
        VALIDATION["lora", 1e-3][0],
        100.0,
    )

    artifacts = MlflowClient(tracking_uri=store).list_artifacts(parent, "report")
    assert {"report/summary.md", "report/summary.csv", "report/training.lr.png"} <= {a.path for a in artifacts}


def test_searched_method_mappings_are_distinct_arms(tmp_path, store, caplog):
    space = {"method": {"grid": [LORA_R2, LORA_R8, SDLORA]}, "training.seed": {"grid": [0, 1]}}
    spec = make_spec(tmp_path, store, space)
    accuracies = [(LORA_R2, [0.70, 0.74]), (LORA_R8, [0.80, 0.82]), (SDLORA, [0.76, 0.78])]
    trials = [
        trial(
            spec, 2 * arm + seed, "TERMINATED", {"method": method, "training.seed": seed}, {"eval/accuracy": accuracy}
        )
        for arm, (method, values) in enumerate(accuracies)
        for seed, accuracy in enumerate(values)
    ]
    out = tmp_path / "elsewhere"

    with caplog.at_level(logging.WARNING, logger="pipeline.results.report"):
        folder = write_report(spec, trials, SweepTracker(spec), out=out, log=lambda _: None)

    assert folder == out
    assert_plots(folder, list(space))
    rows = read_rows(folder)
    assert list(rows) == ["lora r8 out_proj+x_proj", "sdlora", "lora r2 out_proj+x_proj"]  # best first
    assert [row["method"] for row in rows.values()] == ["lora", "sdlora", "lora"]
    assert float(rows["lora r2 out_proj+x_proj"]["eval/accuracy mean"]) == pytest.approx(0.72, abs=1e-12)
    assert float(rows["lora r2 out_proj+x_proj"]["eval/accuracy std"]) == pytest.approx(math.sqrt(8e-4), abs=1e-12)
    assert rows["lora r8 out_proj+x_proj"]["best"] == "True"
    assert all(row["test/accuracy mean"] == "" for row in rows.values())
    # No test metric: the comparison falls back to validation, against the better LoRA arm.
    summary = (folder / "summary.md").read_text()
    assert (
        "SDLoRA does not beat the best LoRA arm (lora r8 out_proj+x_proj) on eval/accuracy after the whole training: "
        in summary
    )
    assert "a difference of -0.04, 2.8 pooled standard deviations." in summary
    assert "no MLflow run for sweep" in caplog.text


def test_a_difference_inside_the_seeds_spread_is_called_no_clear_difference(tmp_path, store):
    spec = make_spec(tmp_path, store, {"method.name": {"grid": ["lora", "sdlora"]}})

    def row(method: str, test: list[float]) -> ArmSummary:
        return ArmSummary(Arm(method, method, method), {}, Stats.of([0.5, 0.6]), Stats.of(test), None, None)

    budget = Budget(2, "epoch")
    close = baseline_verdicts(spec, [row("sdlora", [0.70, 0.74, 0.78]), row("lora", [0.69, 0.73, 0.77])], budget)
    assert close.startswith("SDLoRA beats the best LoRA arm (lora)")
    assert close.endswith("0.25 pooled standard deviations: within the spread over seeds, not a clear difference.")
    clear = baseline_verdicts(spec, [row("sdlora", [0.80, 0.81, 0.82]), row("lora", [0.69, 0.70, 0.71])], budget)
    assert clear.endswith("11 pooled standard deviations.")


# An ASHA sweep over three epochs: each arm's eval/accuracy per epoch, and its test accuracy when it trained to the
# end. Only SDLoRA at lr 0.01 survives the first rung; after one epoch, LoRA (0.55) is ahead of every SDLoRA trial.
SDLORA_ARM = {"name": "sdlora", "channels_frozen": 0.9}
LORA_ARM = {"name": "lora", "lora_rank": 4, "lora_targets": ["x_proj", "out_proj"]}
ASHA_CURVES = {
    ("sdlora", 0.01): ([0.50, 0.70, 0.80], 0.75),
    ("sdlora", 0.03): ([0.45], None),
    ("lora", 0.01): ([0.55], None),
    ("lora", 0.03): ([0.40], None),
}
STEPS_PER_EPOCH = 20


def test_an_asha_stopped_arm_is_compared_at_equal_budget(tmp_path, store):
    space = {"method": {"grid": [SDLORA_ARM, LORA_ARM]}, "training.lr": {"grid": [0.01, 0.03]}}
    spec = make_spec(tmp_path, store, space).with_overrides({"training.epochs": 3})
    tracker = SweepTracker(spec)
    tracker.start_sweep()
    trials = []
    for number, ((name, lr), (curve, test)) in enumerate(ASHA_CURVES.items()):
        config = {"method": SDLORA_ARM if name == "sdlora" else LORA_ARM, "training.lr": lr}
        trial_id = f"t{number}"
        tracker.trial_run(trial_id, config)
        for epoch, accuracy in enumerate(curve, start=1):  # what the sweep's MLflow callback logs per report
            step = epoch * STEPS_PER_EPOCH
            loss = [[step - 10, 2.0 / epoch], [step, 1.8 / epoch]]
            tracker.log_metrics(trial_id, {"eval/accuracy": accuracy, "epoch": epoch, "train/step_loss": loss}, step)
        last = {"eval/accuracy": curve[-1], "epoch": len(curve), "step": len(curve) * STEPS_PER_EPOCH,
                "training_iteration": len(curve), "trainable_parameters": 500 if name == "sdlora" else 900,
                **({"test/accuracy": test} if test is not None else {})}  # fmt: skip
        trials.append(TrialOutcome(trial_id, "TERMINATED", config, last, spec.with_overrides(config)))
    assert [trial.stopped_early for trial in trials] == [False, True, True, True]
    logged: list[str] = []

    folder = write_report(spec, trials, tracker, log=logged.append)

    summary = (folder / "summary.md").read_text()
    assert "4 of 4 trials; 3 stopped early by the scheduler" in summary
    # ranked at the common budget, one epoch: LoRA first, although SDLoRA's survivor ended at 0.8
    assert (
        "| **lora r4 x_proj+out_proj** (best) | 2 (2) | 0.55 ± – | training.lr=0.01 | 1 of 3 (stopped) | 0.55 ± – | – |"
    ) in summary
    assert "| sdlora ch0.9 | 2 (1) | 0.5 ± – | training.lr=0.01 | 3 of 3 | 0.8 ± – | 0.75 ± – |" in summary
    verdict = (
        "SDLoRA does not beat the best LoRA arm (lora r4 x_proj+out_proj) on eval/accuracy at equal budget, after "
        "1 epoch each: 0.5 ± – (n=1) vs 0.55 ± – (n=1), a difference of -0.05, the spread over seeds is unknown "
        "(one seed each). ASHA stopped trials early (SDLoRA's best setting reached 3 epochs, LoRA's 1), so their "
        "last reports and test scores are not compared."
    )
    assert verdict in summary and verdict in flat("\n".join(logged))
    rows = read_rows(folder)
    assert list(rows) == ["lora r4 x_proj+out_proj", "sdlora ch0.9"]
    sdlora = rows["sdlora ch0.9"]
    assert (sdlora["stopped_early"], float(sdlora["epochs"]), sdlora["finished"]) == ("1", 3, "True")
    assert float(sdlora["eval/accuracy after 1 epoch mean"]) == 0.5
    with (folder / "trials.csv").open(newline="") as file:
        assert [row["stopped_early"] for row in csv.DictReader(file)] == ["False", "True", "True", "True"]
    assert_plots(folder, list(space))
    assert not (folder / "time.png").exists()  # no trial has a cost record


# Four epochs. LoRA at lr 0.01 lost its third epoch's report (a sweep interrupted as that report was made, before
# sdtune reconciled such reports), and ended best; SDLoRA's trials were stopped by ASHA after 3 epochs and 1.
GAP_CURVES = {
    ("lora", 0.01): {1: 0.50, 2: 0.60, 4: 0.90},
    ("lora", 0.03): {1: 0.45, 2: 0.55, 3: 0.65, 4: 0.70},
    ("sdlora", 0.01): {1: 0.52, 2: 0.62, 3: 0.72},
    ("sdlora", 0.03): {1: 0.40},
}


def test_a_history_with_a_gap_is_read_by_epoch_not_by_position(tmp_path, store):
    """The common budget is 3 epochs (SDLoRA's longest trial). LoRA at lr 0.01 has no value after 3 epochs: read by
    position, its third evaluation (epoch 4's 0.9) would stand for epoch 3 and win LoRA's row and the ranking."""
    space = {"method": {"grid": [SDLORA_ARM, LORA_ARM]}, "training.lr": {"grid": [0.01, 0.03]}}
    spec = make_spec(tmp_path, store, space).with_overrides({"training.epochs": 4})
    tracker = SweepTracker(spec)
    tracker.start_sweep()
    trials = []
    for number, ((name, lr), curve) in enumerate(GAP_CURVES.items()):
        config = {"method": SDLORA_ARM if name == "sdlora" else LORA_ARM, "training.lr": lr}
        trial_id = f"t{number}"
        tracker.trial_run(trial_id, config)
        for epoch, accuracy in curve.items():
            tracker.log_report(trial_id, {"eval/accuracy": accuracy, "epoch": epoch}, epoch * STEPS_PER_EPOCH)
        last = max(curve)
        report = {"eval/accuracy": curve[last], "epoch": last, "step": last * STEPS_PER_EPOCH}
        trials.append(TrialOutcome(trial_id, "TERMINATED", config, report, spec.with_overrides(config)))

    folder = write_report(spec, trials, tracker, log=lambda _: None)

    summary = (folder / "summary.md").read_text()
    assert "| **sdlora ch0.9** (best) | 2 (2) | 0.72 ± – | training.lr=0.01 | 3 of 4 (stopped) |" in summary
    # after 3 epochs: lr 0.03's 0.65 (lr 0.01 has no third epoch); at the end: lr 0.01's 0.9
    assert "| lora r4 x_proj+out_proj | 2 (0) | 0.65 ± – | training.lr=0.03 | 4 of 4 | 0.9 ± – |" in summary
    rows = read_rows(folder)
    assert list(rows) == ["sdlora ch0.9", "lora r4 x_proj+out_proj"]
    assert float(rows["lora r4 x_proj+out_proj"]["eval/accuracy after 3 epochs mean"]) == 0.65


def test_trials_csv_says_each_trials_batch_layout_padding_and_truncated_examples(tmp_path, store):
    from pipeline.results.report import write_trials_csv

    spec = make_spec(tmp_path, store, {"training.batching": {"grid": ["padded", "auto"]}})
    layouts = {"padded": ("padded", 0.42, 3), "auto": ("packed", 0.0, 3)}
    trials = [
        trial(spec, number, "TERMINATED", {"training.batching": asked},
              {"eval/accuracy": 0.5, "tokens_per_s": 1000.0, "batching": layout, "train/padding": padding,
               "train/truncated_examples": cut})
        for number, (asked, (layout, padding, cut)) in enumerate(layouts.items())
    ]  # fmt: skip
    write_trials_csv(spec, trials, tmp_path / "trials.csv")
    with (tmp_path / "trials.csv").open(newline="") as file:
        rows = {row["training.batching"]: row for row in csv.DictReader(file)}
    assert {asked: (row["batching"], float(row["train/padding"])) for asked, row in rows.items()} == {
        "padded": ("padded", 0.42),
        "auto": ("packed", 0.0),
    }
    assert {row["train/truncated_examples"] for row in rows.values()} == {"3"}


def test_a_sweep_of_several_methods_names_the_winner_and_says_which_leads_are_inside_the_spread(tmp_path, store):
    """Four methods' best arms, test accuracy over three seeds each: SDLoRA leads; its lead over LoRA is inside the
    seeds' spread, its leads over full fine-tuning and SDT are clear. Two methods get no ranking (the baseline verdict
    says it all)."""
    spec = make_spec(tmp_path, store, {"method.name": {"grid": ["sdlora", "lora", "full", "sdt"]}})

    def row(method: str, test: list[float]) -> ArmSummary:
        return ArmSummary(Arm(method, method, method), {}, Stats.of([0.5, 0.6]), Stats.of(test), None, None)

    budget = Budget(2, "epoch")
    rows = [
        row("sdlora", [0.80, 0.82, 0.84]),
        row("lora", [0.79, 0.81, 0.83]),
        row("full", [0.70, 0.71, 0.72]),
        row("sdt", [0.60, 0.61, 0.62]),
    ]
    ranking = method_ranking(spec, rows, budget)
    assert ranking.startswith("Best method: SDLoRA (sdlora), against each other method's best arm: ahead of LoRA")
    assert "a difference of +0.01, 0.5 pooled standard deviations: within the spread over seeds" in ranking
    assert "; ahead of full fine-tuning on test/accuracy after the whole training" in ranking
    assert "a difference of +0.11, 7 pooled standard deviations; ahead of SDT" in ranking
    assert "a difference of +0.21, 13 pooled standard deviations;" in ranking
    assert ranking.endswith("SDLoRA is clearly ahead (beyond the seeds' spread) of 2 of 3.")
    verdicts = sweep_verdicts(spec, rows, budget)
    assert verdicts.startswith(ranking) and "SDLoRA beats the best LoRA arm (lora)" in verdicts
    assert method_ranking(spec, rows[:2], budget) == ""
