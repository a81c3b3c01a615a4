"""Arms at equal budgets: each arm's best setting of the searched hyperparameters, its seeds' statistics at its last
reports and at the common budget every compared arm reached (read from the per-report history in MLflow)."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.results.arms import METHOD_KEYS, Arm, arm_of, canonical, value_label
from pipeline.results.outcomes import (
    TUNE_ERROR,
    TUNE_TERMINATED,
    NoUsableTrialError,
    TrialOutcome,
    metric_on_test,
)
from pipeline.results.tracking import SweepTracker, is_finite_number
from pipeline.spec.job import JobSpec

logger = logging.getLogger(__name__)

STEP_LOSS = "train/step_loss"  # the per-step training loss each trial's MLflow run holds
SEED_KEY = "training.seed"
MISSING = "–"


@dataclass(frozen=True)
class Stats:
    n: int
    mean: float
    std: float | None  # sample standard deviation (ddof=1); None for a single value

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats | None:
        if not values:
            return None
        return cls(len(values), statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)

    def __str__(self) -> str:
        spread = MISSING if self.std is None else number(self.std)
        return f"{number(self.mean)} ± {spread}"


@dataclass(frozen=True)
class Budget:
    """The training every compared arm reached: ``at`` epochs, or optimizer steps where the trials evaluate within
    epochs too (``training.eval_every_steps``): :func:`evaluation_unit`."""

    at: int
    unit: str  # "epoch" or "step"

    def __str__(self) -> str:
        return f"{self.at} {self.unit}{'s' if self.at != 1 else ''}"


@dataclass(frozen=True)
class ArmSummary:
    arm: Arm
    setting: dict[str, Any]  # the chosen values of the searched hyperparameters, except the method and the seed
    validation: Stats  # of the chosen setting's seeds, at their last reports
    test: Stats | None
    trainable_parameters: float | None
    tokens_per_s: float | None
    epochs: float | None = None  # the epochs the chosen setting's seeds reached (the most of them)
    finished: bool = True  # every seed of the chosen setting trained to the end (none stopped early)
    trials: int = 0  # the arm's scored trials
    stopped: int = 0  # how many of them the scheduler stopped early
    at_budget: Stats | None = None  # the arm's best setting at the common budget
    budget_setting: dict[str, Any] | None = None  # that setting
    best: bool = False


def number(value: float) -> str:
    return f"{value:.4g}"


def setting_keys(spec: JobSpec) -> list[str]:
    return [key for key in spec.search.space if key not in METHOD_KEYS and key != SEED_KEY]


def finite_values(trials: Sequence[TrialOutcome], key: str) -> list[float]:
    return [float(trial.metrics[key]) for trial in trials if is_finite_number(trial.metrics.get(key))]


def mean_or_none(values: Sequence[float]) -> float | None:
    return statistics.mean(values) if values else None


def best_setting(spec: JobSpec, settings: Sequence[list[TrialOutcome]], score) -> list[TrialOutcome]:
    """The seeds of the setting with the best mean ``score(trial)`` (the first of equals)."""
    pick = max if spec.search.mode == "max" else min
    return pick(settings, key=lambda seeds: statistics.mean(score(trial) for trial in seeds))


Curves = Mapping[str, Mapping[int, float]]  # trial id -> {epoch (or step) of an evaluation: the search metric then}


def evaluation_unit(spec: JobSpec) -> str:
    """What an evaluation is keyed by: its epoch where the trials evaluate at the end of each epoch only (then
    epochs compare trials of different batch sizes), else its optimizer step."""
    return "epoch" if spec.training.eval_every_steps is None else "step"


def metric_curves(spec: JobSpec, trials: Sequence[TrialOutcome], tracker: SweepTracker) -> dict[str, dict[int, float]]:
    """Each scored trial's search metric at every evaluation its MLflow run holds, keyed by the evaluation's epoch
    (the run's ``epoch`` at the same step) or step (:func:`evaluation_unit`), never by its place in the history: a
    history with a gap leaves that evaluation out and moves no other. A trial without a history (no run) has its
    last report only."""
    metric, unit = spec.search.metric, evaluation_unit(spec)
    curves = {}
    for trial in trials:
        if trial.score(metric) is None:
            continue
        history = tracker.metric_history(trial.trial_id, metric)
        if unit == "epoch":
            epoch_at = dict(tracker.metric_history(trial.trial_id, "epoch"))
            curve = {round(epoch_at[step]): value for step, value in history if step in epoch_at}
        else:
            curve = dict(history)
        curves[trial.trial_id] = curve or {round(trial.metrics.get(unit) or 1): trial.score(metric)}
    return curves


def common_budget(spec: JobSpec, by_arm: Mapping[str, Sequence[TrialOutcome]], curves: Curves) -> Budget:
    """The most epochs (or steps) every arm reached with at least one trial."""
    reached = [max(max(curves[trial.trial_id]) for trial in arm_trials) for arm_trials in by_arm.values()]
    return Budget(min(reached), evaluation_unit(spec))


def summarize(
    spec: JobSpec, arm: Arm, settings: Sequence[list[TrialOutcome]], curves: Curves, budget: Budget
) -> ArmSummary:
    """The arm's row: its best setting by last report (what export would pick), and its best at ``budget``."""
    metric = spec.search.metric
    seeds = best_setting(spec, settings, lambda trial: trial.score(metric))
    validation = Stats.of([trial.score(metric) for trial in seeds])
    assert validation is not None  # a setting holds at least one scored trial
    # A trial whose history lacks the budget's evaluation (no MLflow history, or a gap) counts for no setting there.
    reached = [[t for t in setting if budget.at in curves[t.trial_id]] for setting in settings]
    reached = [setting for setting in reached if setting]
    budget_seeds = best_setting(spec, reached, lambda t: curves[t.trial_id][budget.at]) if reached else []
    everyone = [trial for setting in settings for trial in setting]
    return ArmSummary(
        arm=arm,
        setting={key: seeds[0].config.get(key) for key in setting_keys(spec)},
        validation=validation,
        test=Stats.of(finite_values(seeds, metric_on_test(metric))),
        trainable_parameters=mean_or_none(finite_values(seeds, "trainable_parameters")),
        tokens_per_s=mean_or_none(finite_values(seeds, "tokens_per_s")),
        epochs=max(finite_values(seeds, "epoch"), default=None),
        finished=not any(trial.stopped_early for trial in seeds),
        trials=len(everyone),
        stopped=sum(trial.stopped_early for trial in everyone),
        at_budget=Stats.of([curves[t.trial_id][budget.at] for t in budget_seeds]),
        budget_setting={key: budget_seeds[0].config.get(key) for key in setting_keys(spec)} if budget_seeds else None,
    )


def arm_summaries(spec: JobSpec, trials: Sequence[TrialOutcome], curves: Curves) -> tuple[list[ArmSummary], Budget]:
    """One row per arm, best first at the common budget and marked ``best``, and that budget; failed and NaN
    trials are left out."""
    metric = spec.search.metric
    arms: dict[str, Arm] = {}
    settings: dict[str, dict[str, list[TrialOutcome]]] = {}  # arm key -> setting -> its seeds
    for trial in trials:
        if trial.score(metric) is None:
            continue
        arm = arm_of(trial)
        arms.setdefault(arm.key, arm)
        setting = canonical([trial.config.get(key) for key in setting_keys(spec)])
        settings.setdefault(arm.key, {}).setdefault(setting, []).append(trial)
    if not arms:
        raise NoUsableTrialError(f"nothing to report: {exclusion_note(metric, trials)}")
    by_arm = {key: [trial for seeds in by_setting.values() for trial in seeds] for key, by_setting in settings.items()}
    budget = common_budget(spec, by_arm, curves)
    rows = [
        summarize(spec, arms[key], list(by_setting.values()), curves, budget) for key, by_setting in settings.items()
    ]
    comparable = all(row.at_budget for row in rows)
    rows.sort(key=lambda row: (row.at_budget if comparable else row.validation).mean, reverse=spec.search.mode == "max")
    return [replace(rows[0], best=True), *rows[1:]], budget


def pooled_std(a: Stats, b: Stats) -> float | None:
    """The pooled sample standard deviation of two groups; None when neither has two values."""
    degrees = a.n + b.n - 2
    if degrees < 1:
        return None
    squares = (a.n - 1) * (a.std or 0.0) ** 2 + (b.n - 1) * (b.std or 0.0) ** 2
    return math.sqrt(squares / degrees)


def exclusion_note(metric: str, trials: Sequence[TrialOutcome]) -> str:
    """``"10 of 12 trials; excluded: 1 failed, 1 without a finite eval/accuracy"``."""
    usable = sum(trial.score(metric) is not None for trial in trials)
    failed = sum(trial.status == TUNE_ERROR for trial in trials)
    unfinished = sum(trial.status not in (TUNE_TERMINATED, TUNE_ERROR) for trial in trials)
    no_value = len(trials) - usable - failed - unfinished
    counts = [(failed, "failed"), (unfinished, "unfinished"), (no_value, f"without a finite {metric}")]
    excluded = ", ".join(f"{count} {why}" for count, why in counts if count)
    return f"{usable} of {len(trials)} trials" + (f"; excluded: {excluded}" if excluded else "")


def epochs_text(row: ArmSummary) -> str:
    return MISSING if row.epochs is None else f"{row.epochs:g}"


def setting_text(setting: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value_label(value)}" for key, value in setting.items()) or MISSING
