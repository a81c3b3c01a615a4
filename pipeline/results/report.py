"""The report of a sweep, read back with no Ray cluster running, written to ``<sweep dir>/report`` and logged as
the ``report/`` artifacts of the sweep's MLflow parent run: a "best vs baselines" table and verdict, learning
curves, the metric against every searched hyperparameter and where the time went.

Each trial counts by its last report, as in :mod:`pipeline.results.outcomes`; failed trials and trials without a finite
metric are left out, and counted. Finished trials fall into *arms* (:mod:`pipeline.results.arms`), and within an arm into
*settings* of the other searched hyperparameters. Seeds (``training.seed``) are repetitions of a setting, not part
of it: an arm is represented by its setting with the best mean validation metric over seeds, and the test metric is
read for that setting only, so the test split never picks anything.

Arms are compared at equal budgets. ASHA stops trials early, so the last reports of two arms can stand for 3 epochs
against 1: the *common budget* is the most evaluations (epochs, when trials evaluate once an epoch) that every arm
reached with at least one trial, and the ranking and the verdicts (a method against the baseline it names in
``sdt.METHODS``: SDLoRA against LoRA) use each arm's best setting at that budget, read from the per-report history
the trials' MLflow runs hold. The last-report and test columns, the epochs
each setting reached and how many trials the scheduler stopped are shown beside it. Only when the compared settings
all trained to the end does the verdict use their last reports (and the test metric).
"""

from __future__ import annotations

import csv
import logging
import math
import random
import re
import statistics
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import sdt
from pipeline.results.arms import METHOD_KEYS, Arm, arm_of, canonical, value_label
from pipeline.results.outcomes import (
    COST_PARTS,
    TUNE_ERROR,
    TUNE_TERMINATED,
    NoUsableTrialError,
    TrialOutcome,
    metric_on_test,
)
from pipeline.results.tracking import SweepTracker, is_finite_number
from pipeline.spec.job import Domain, JobSpec
from pipeline.storage.paths import StoragePath, local_copy, storage_path, write_directory

logger = logging.getLogger(__name__)

REPORT_DIR = "report"  # under the sweep directory, and the artifact path in the parent run
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
TRIALS_CSV = "trials.csv"
CURVES_PNG = "learning_curves.png"
COST_PNG = "time.png"
STEP_LOSS = "train/step_loss"  # the per-step training loss each trial's MLflow run holds
CONSOLE_WIDTH = 110  # the verdict and notes are wrapped to this on the console
TICK_WIDTH = 22  # characters per line of a category's label under its tick
# Columns of trials.csv besides the searched values: the last report's, where present.
TRIAL_COLUMNS = (
    "step",
    "epoch",
    "train/loss",
    "trainable_parameters",
    "tokens_per_s",
    "peak_memory_gib",
    "warmup/shared",
)
SEED_KEY = "training.seed"
LOG_SPAN = 10  # positive values spanning this factor or more are drawn on a log axis
JITTER = 0.15  # half-width of the spread of points around a category, so repeated seeds do not hide each other
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
    """The training every compared arm reached: ``reports`` evaluations, which are epochs when the trials evaluate
    once an epoch (``unit``)."""

    reports: int
    unit: str  # "epoch" or "evaluation"

    def __str__(self) -> str:
        return f"{self.reports} {self.unit}{'s' if self.reports != 1 else ''}"


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


# -- values and labels ----------------------------------------------------------------------------------------


def number(value: float) -> str:
    return f"{value:.4g}"


def exclusion_note(metric: str, trials: Sequence[TrialOutcome]) -> str:
    """``"10 of 12 trials; excluded: 1 failed, 1 without a finite eval/accuracy"``."""
    usable = sum(trial.score(metric) is not None for trial in trials)
    failed = sum(trial.status == TUNE_ERROR for trial in trials)
    unfinished = sum(trial.status not in (TUNE_TERMINATED, TUNE_ERROR) for trial in trials)
    no_value = len(trials) - usable - failed - unfinished
    counts = [(failed, "failed"), (unfinished, "unfinished"), (no_value, f"without a finite {metric}")]
    excluded = ", ".join(f"{count} {why}" for count, why in counts if count)
    return f"{usable} of {len(trials)} trials" + (f"; excluded: {excluded}" if excluded else "")


def failures_text(trials: Sequence[TrialOutcome]) -> str:
    """One line per failed trial: its arm and why it failed (a diverged loss, an error)."""
    failed = [trial for trial in trials if trial.status == TUNE_ERROR]
    if not failed:
        return "None."
    return "\n".join(f"- `{t.trial_id}` ({arm_of(t).label}): {t.error or 'unknown error'}" for t in failed)


# -- best vs baselines ----------------------------------------------------------------------------------------


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


# -- equal budgets --------------------------------------------------------------------------------------------

Curves = Mapping[str, Mapping[int, float]]  # trial id -> {evaluation number (1, 2, ...): the search metric then}


def metric_curves(spec: JobSpec, trials: Sequence[TrialOutcome], tracker: SweepTracker) -> dict[str, dict[int, float]]:
    """Each scored trial's search metric at every evaluation, from its MLflow run's history; a trial without one
    (no run) has its last report only, counted as evaluation ``training_iteration`` (else its epoch)."""
    metric = spec.search.metric
    curves = {}
    for trial in trials:
        if trial.score(metric) is None:
            continue
        history = tracker.metric_history(trial.trial_id, metric)
        if history:
            curves[trial.trial_id] = {index: value for index, (_, value) in enumerate(history, start=1)}
        else:
            reports = trial.metrics.get("training_iteration") or trial.metrics.get("epoch") or 1
            curves[trial.trial_id] = {int(reports): trial.score(metric)}
    return curves


def common_budget(spec: JobSpec, by_arm: Mapping[str, Sequence[TrialOutcome]], curves: Curves) -> Budget:
    """The most evaluations every arm reached with at least one trial."""
    reached = [max(max(curves[trial.trial_id]) for trial in arm_trials) for arm_trials in by_arm.values()]
    return Budget(min(reached), "epoch" if spec.training.eval_every_steps is None else "evaluation")


def summarize(
    spec: JobSpec, arm: Arm, settings: Sequence[list[TrialOutcome]], curves: Curves, budget: Budget
) -> ArmSummary:
    """The arm's row: its best setting by last report (what export would pick), and its best at ``budget``."""
    metric = spec.search.metric
    seeds = best_setting(spec, settings, lambda trial: trial.score(metric))
    validation = Stats.of([trial.score(metric) for trial in seeds])
    assert validation is not None  # a setting holds at least one scored trial
    reached = [[t for t in setting if budget.reports in curves[t.trial_id]] for setting in settings]
    reached = [setting for setting in reached if setting]  # empty only without MLflow history (see metric_curves)
    budget_seeds = best_setting(spec, reached, lambda t: curves[t.trial_id][budget.reports]) if reached else []
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
        at_budget=Stats.of([curves[t.trial_id][budget.reports] for t in budget_seeds]),
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


def baseline_verdicts(spec: JobSpec, rows: Sequence[ArmSummary], budget: Budget) -> str:
    """The :func:`verdict` of each method that names a baseline (``sdt.Method.baseline``: SDLoRA's is LoRA) and of
    which, or of whose baseline, the sweep finished an arm; of every such method when the sweep finished none of
    them. One paragraph each."""
    pairs = [(name, method.baseline) for name, method in sdt.METHODS.items() if method.baseline]
    present = {row.arm.method for row in rows}
    compared = [pair for pair in pairs if present & set(pair)] or pairs
    return "\n\n".join(verdict(spec, rows, budget, method, baseline) for method, baseline in compared)


def method_title(method: str) -> str:
    """How people write the method's name (``SDLoRA``); a baseline nobody registered goes by its name."""
    return sdt.METHODS[method].title if method in sdt.METHODS else method


def verdict(spec: JobSpec, rows: Sequence[ArmSummary], budget: Budget, method: str, baseline: str) -> str:
    """Whether the best arm of ``method`` beats the best arm of ``baseline``, at equal budgets, and by how many
    pooled standard deviations. When both arms' chosen settings trained to the end, on their test metric means
    (validation when either lacks one); otherwise, when ASHA stopped one of them, on the validation metric of each
    arm's best setting at the common ``budget``."""
    metric = spec.search.metric
    ours_title, theirs_title = method_title(method), method_title(baseline)
    ours_row = next((row for row in rows if row.arm.method == method), None)
    theirs_row = next((row for row in rows if row.arm.method == baseline), None)
    if ours_row is None or theirs_row is None:
        missing = " and ".join(name for name, row in ((method, ours_row), (baseline, theirs_row)) if row is None)
        return f"No {ours_title} vs {theirs_title} comparison: no {missing} trial finished with a finite {metric}."
    note = ""
    if ours_row.finished and theirs_row.finished and ours_row.epochs == theirs_row.epochs:
        where = "after the whole training"
        if ours_row.test and theirs_row.test:
            compared, ours, theirs = metric_on_test(metric), ours_row.test, theirs_row.test
        else:
            compared, ours, theirs = metric, ours_row.validation, theirs_row.validation
    elif ours_row.at_budget is None or theirs_row.at_budget is None:
        return (
            f"No {ours_title} vs {theirs_title} comparison at equal budget: ASHA stopped trials early, and without "
            f"the trials' per-evaluation history (their MLflow runs) their {metric} after {budget} is unknown."
        )
    else:
        where = f"at equal budget, after {budget} each"
        compared, ours, theirs = metric, ours_row.at_budget, theirs_row.at_budget
        note = (
            f" ASHA stopped trials early ({ours_title}'s best setting reached {epochs_text(ours_row)} epochs, "
            f"{theirs_title}'s {epochs_text(theirs_row)}), so their last reports and test scores are not compared."
        )
    difference = ours.mean - theirs.mean
    beats = difference > 0 if spec.search.mode == "max" else difference < 0
    spread = pooled_std(ours, theirs)
    if spread is None:
        relative = "the spread over seeds is unknown (one seed each)"
    elif spread == 0:
        relative = "with no spread over seeds"
    else:
        relative = f"{abs(difference) / spread:.2g} pooled standard deviations"
        if abs(difference) < spread:
            relative += ": within the spread over seeds, not a clear difference"
    return (
        f"{ours_title} {'beats' if beats else 'does not beat'} the best {theirs_title} arm ({theirs_row.arm.label}) "
        f"on {compared} {where}: {ours} (n={ours.n}) vs {theirs} (n={theirs.n}), a difference of {difference:+.4g}, "
        f"{relative}.{note}"
    )


def epochs_text(row: ArmSummary) -> str:
    return MISSING if row.epochs is None else f"{row.epochs:g}"


# -- the summary files ----------------------------------------------------------------------------------------


def setting_text(setting: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value_label(value)}" for key, value in setting.items()) or MISSING


def count_text(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.0f}"


def held_out_cell(row: ArmSummary) -> str:
    if row.test is None:
        return MISSING
    # Said only when it differs: a test report can be missing where the validation one is not.
    return str(row.test) if row.test.n == row.validation.n else f"{row.test} (n={row.test.n})"


def reached_cell(spec: JobSpec, row: ArmSummary) -> str:
    """``3 of 3``, or ``1 of 3 (stopped)`` when ASHA stopped the chosen setting."""
    return f"{epochs_text(row)} of {spec.training.epochs}" + ("" if row.finished else " (stopped)")


def summary_table(spec: JobSpec, rows: Sequence[ArmSummary], budget: Budget) -> str:
    metric = spec.search.metric
    header = [
        "arm", "trials (stopped early)", f"{metric} after {budget}", "its setting", "epochs reached",
        f"{metric} at the end", metric_on_test(metric), "trainable parameters", "tokens/s", "hyperparameters",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        arm = f"**{row.arm.label}** (best)" if row.best else row.arm.label
        budget_cells = [str(row.at_budget), setting_text(row.budget_setting)] if row.at_budget else [MISSING, MISSING]
        cells = [
            arm, f"{row.trials} ({row.stopped})", *budget_cells, reached_cell(spec, row), str(row.validation),
            held_out_cell(row), count_text(row.trainable_parameters), count_text(row.tokens_per_s), setting_text(row.setting),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(
    spec: JobSpec,
    trials: Sequence[TrialOutcome],
    table: str,
    verdicts: str,
    cost: str,
    budget: Budget,
    plots: Sequence[str],
) -> str:
    metric, mode = spec.search.metric, spec.search.mode
    stopped = sum(trial.stopped_early for trial in trials)
    how_far = (
        "the most training every arm reached: ASHA stopped some trials sooner" if stopped else "the whole training"
    )
    pictures = [f"![{Path(name).stem}]({name})" for name in plots if name not in (CURVES_PNG, COST_PNG)]
    time_picture = [f"![time]({COST_PNG})"] if COST_PNG in plots else []
    return "\n\n".join([
        f"# Sweep report: {spec.name}",
        f"`{metric}` ({mode}): {exclusion_note(metric, trials)}; {stopped} stopped early by the scheduler.",
        "## Best vs baselines, at equal budgets",
        f"Per arm: `{metric}` after {budget} ({how_far}) of its best setting then, which ranks the arms; and its "
        f"setting with the best `{metric}` at the end of its trials, with the epochs it reached and its "
        f"`{metric_on_test(metric)}` (scored only for trials that trained to the end). Mean ± sample standard "
        f"deviation over seeds ({MISSING} for one seed).",
        table,
        verdicts,
        f"![learning curves]({CURVES_PNG})",
        "## Failed trials",
        failures_text(trials),
        "## Where the time went",
        *time_picture,
        cost,
        f"## {metric} against each searched hyperparameter",
        *pictures,
    ]) + "\n"  # fmt: skip


# -- the GPU-time breakdown -----------------------------------------------------------------------------------


def cost_totals(trials: Sequence[TrialOutcome]) -> dict[str, float]:
    """Seconds per part summed over the trials that have a cost record, weighted by the GPUs each held (device
    seconds; plain seconds when the trials held no GPU), and ``wall``, the trials' summed wall time so weighted;
    ``queued``, the seconds before the trials' worker groups were placed (plain seconds: no GPU was theirs then)."""
    recorded = [trial.cost for trial in trials if trial.cost]
    totals = {part: 0.0 for part in ("wall", *COST_PARTS)}
    for cost in recorded:
        weight = cost["gpus"] or 1.0
        for part in totals:
            totals[part] += cost.get(part, 0.0) * weight
    totals["queued"] = sum(cost.get("queued", 0.0) for cost in recorded)
    return totals


def cost_table(trials: Sequence[TrialOutcome]) -> str:
    """One row per trial with a cost record (seconds per part, and the seconds before its placement: queued) and
    a total row with each part's share."""
    recorded = [trial for trial in trials if trial.cost]
    if not recorded:
        return "No trial of this sweep has a cost record (the sweep driver writes one per trial as it ends)."
    unit = "GPU-s" if any(trial.cost["gpus"] for trial in recorded) else "s"
    header = ["trial", "arm", "GPUs", "queued s", "wall s", *(f"{part} s" for part in COST_PARTS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial in recorded:
        cost = trial.cost
        cells = [
            trial.trial_id,
            arm_of(trial).label,
            f"{cost['gpus']:g}",
            f"{cost.get('queued', 0.0):.1f}",
            f"{cost['wall']:.1f}",
        ]
        cells += [f"{cost.get(part, 0.0):.1f}" for part in COST_PARTS]
        lines.append("| " + " | ".join(cells) + " |")
    totals = cost_totals(recorded)
    shares = [f"{totals[part]:.0f} ({totals[part] / totals['wall']:.0%})" for part in COST_PARTS]
    lines.append("| " + " | ".join([f"**total ({unit})**", "", "", "", f"{totals['wall']:.0f}", *shares]) + " |")
    return "\n".join(lines)


def csv_cell(value: Any) -> Any:
    """Numbers as they are (full precision), lists and mappings as JSON, missing as empty."""
    if value is None:
        return ""
    return canonical(value) if isinstance(value, list | tuple | Mapping) else value


def write_csv(spec: JobSpec, rows: Sequence[ArmSummary], budget: Budget, path: Path) -> None:
    metric, test = spec.search.metric, metric_on_test(spec.search.metric)
    keys = setting_keys(spec)
    at = f"{metric} after {budget}"
    header = [
        "arm", "method", "best", "trials", "stopped_early", f"{at} mean", f"{at} std", "seeds", "epochs", "finished",
        f"{metric} mean", f"{metric} std", f"{test} mean", f"{test} std", "trainable_parameters", "tokens_per_s", *keys,
    ]  # fmt: skip
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for row in rows:
            budget_stats = [row.at_budget.mean, row.at_budget.std] if row.at_budget else [None, None]
            test_stats = [row.test.mean, row.test.std] if row.test else [None, None]
            values = [
                row.arm.label, row.arm.method, row.best, row.trials, row.stopped, *budget_stats, row.validation.n,
                row.epochs, row.finished, row.validation.mean, row.validation.std, *test_stats,
                row.trainable_parameters, row.tokens_per_s, *(row.setting[key] for key in keys),
            ]  # fmt: skip
            writer.writerow([csv_cell(value) for value in values])


def write_trials_csv(spec: JobSpec, trials: Sequence[TrialOutcome], path: Path) -> None:
    """One row per trial, failed ones included: its status, whether the scheduler stopped it early, its searched
    values and last report's numbers."""
    metric, test = spec.search.metric, metric_on_test(spec.search.metric)
    keys = list(spec.search.space)
    columns = [metric, test, *(c for c in TRIAL_COLUMNS if any(c in t.metrics for t in trials))]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial_id", "status", "stopped_early", *keys, *columns, "error"])
        for trial in trials:
            values = [trial.trial_id, trial.status, trial.stopped_early, *(trial.config.get(k) for k in keys)]
            values += [*(trial.metrics.get(c) for c in columns), trial.error]
            writer.writerow([csv_cell(v) for v in values])


# -- plots ----------------------------------------------------------------------------------------------------


def plot_name(key: str) -> str:
    return re.sub(r"[^\w.-]", "_", key) + ".png"


def wants_log_axis(domain: Domain, values: Sequence[float]) -> bool:
    if domain.kind == "loguniform":
        return True
    return min(values) > 0 and max(values) / min(values) >= LOG_SPAN


def category_order(domain: Domain, values: Sequence[Any]) -> list[Any]:
    """The distinct values, in the domain's order where it lists them, then as the trials drew them."""
    listed = domain.candidates() if domain.kind in ("grid", "choice") else []
    ordered: dict[str, Any] = {}
    for value in [*listed, *values]:
        ordered.setdefault(canonical(value), value)
    present = {canonical(value) for value in values}
    return [value for key, value in ordered.items() if key in present]


def categorical_positions(
    key: str, domain: Domain, trials: Sequence[TrialOutcome], values: Sequence[Any], axes: Axes
) -> list[float]:
    """x positions for a strip plot (category index plus jitter) of ``trials`` at ``values``, labelling the
    categories on ``axes`` (a searched ``method`` by its arm's label)."""
    categories = category_order(domain, values)
    index = {canonical(value): position for position, value in enumerate(categories)}
    arm_labels = {canonical(value): arm_of(trial).label for trial, value in zip(trials, values)}
    labels = [arm_labels[canonical(v)] if key == "method" else value_label(v) for v in categories]
    # Arm labels are long ("lora r6 out_proj+dt_proj lora_alpha=6"): wrapped under their tick.
    axes.set_xticks(range(len(categories)), [textwrap.fill(label, TICK_WIDTH) for label in labels])
    axes.set_xlim(-0.5, len(categories) - 0.5)
    jitter = random.Random(0)  # the same picture on every run
    return [index[canonical(value)] + jitter.uniform(-JITTER, JITTER) for value in values]


def arm_colors(trials: Sequence[TrialOutcome]) -> dict[str, str]:
    """One colour per arm (by label order), the same in every picture of the report."""
    labels = sorted({arm_of(trial).label for trial in trials})
    return {label: f"C{index % 10}" for index, label in enumerate(labels)}


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without pyplot: no display, and no process-wide backend to switch
    return figure


def arm_legend(axes: Axes, colors: Mapping[str, str], extra: Sequence[Any] = ()) -> None:
    """A legend beside the axes (never over the data): one entry per arm, then ``extra`` handles."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color, marker="o", linestyle="", label=label) for label, color in colors.items()]
    axes.legend(handles=[*handles, *extra], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def plot_hyperparameter(
    spec: JobSpec,
    key: str,
    domain: Domain,
    trials: Sequence[TrialOutcome],
    curves: Curves,
    budget: Budget,
    colors: Mapping[str, str],
    path: Path,
) -> None:
    """The metric of each finished trial against its value of ``key``, coloured by arm: a dot after the common
    budget (every trial alike), and, for a trial that trained longer, a triangle at its last report joined to it."""
    from matplotlib.lines import Line2D

    metric = spec.search.metric
    scored = [trial for trial in trials if trial.trial_id in curves]
    values = [trial.config.get(key) for trial in scored]
    figure = new_figure(9.5, 4.5)
    axes = figure.add_subplot()
    if all(is_finite_number(value) for value in values):
        positions = [float(value) for value in values]
        if wants_log_axis(domain, positions):
            axes.set_xscale("log")
    else:
        positions = categorical_positions(key, domain, scored, values, axes)
    for position, trial in zip(positions, scored):
        color, curve = colors[arm_of(trial).label], curves[trial.trial_id]
        end = curve[max(curve)]
        if budget.reports in curve:
            axes.scatter(
                [position], [curve[budget.reports]], color=color, edgecolors="black", linewidths=0.5, s=45, zorder=3
            )
        if max(curve) > budget.reports:
            start = curve.get(budget.reports, end)
            axes.plot([position, position], [start, end], color=color, linewidth=1, alpha=0.6)
            axes.scatter([position], [end], color=color, marker="^", s=50, zorder=3)
    ended = f"at the end of a trial that trained longer ({spec.training.epochs} epochs at most)"
    arm_legend(axes, colors, [
        Line2D([], [], color="grey", marker="o", linestyle="", label=f"after {budget}: every trial"),
        Line2D([], [], color="grey", marker="^", linestyle="", label=ended),
    ])  # fmt: skip
    axes.set_xlabel(key)
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.set_title(f"{metric} vs {key}\n{exclusion_note(metric, trials)}", fontsize=10)
    figure.savefig(path, dpi=120)


def setting_styles(spec: JobSpec, trials: Sequence[TrialOutcome]) -> dict[str, str]:
    """A line style per setting of the searched hyperparameters (seeds and arms aside), for the learning curves."""
    styles = ["-", "--", ":", "-."]
    settings = sorted({setting_text({k: t.config.get(k) for k in setting_keys(spec)}) for t in trials})
    return {setting: styles[index % len(styles)] for index, setting in enumerate(settings)}


def plot_learning_curves(
    spec: JobSpec,
    trials: Sequence[TrialOutcome],
    curves: Curves,
    step_losses: Mapping[str, Sequence[tuple[int, float]]],
    budget: Budget,
    colors: Mapping[str, str],
    path: Path,
) -> None:
    """Per trial, coloured by arm and styled by setting: the search metric at each evaluation (a hollow end:
    stopped early by ASHA; the dotted line: the common budget), and the training loss at each logged step."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    metric = spec.search.metric
    scored = [trial for trial in trials if trial.trial_id in curves]
    styles = setting_styles(spec, scored)
    figure = new_figure(14, 4.8)
    left, right = figure.subplots(1, 2)
    for trial in scored:
        color = colors[arm_of(trial).label]
        style = styles[setting_text({k: trial.config.get(k) for k in setting_keys(spec)})]
        points = sorted(curves[trial.trial_id].items())
        left.plot(*zip(*points), color=color, linestyle=style, alpha=0.85, marker="o", markersize=3)
        end = (
            {"facecolors": "none", "edgecolors": color, "linewidths": 1.5} if trial.stopped_early else {"color": color}
        )
        left.scatter(*points[-1], s=55, zorder=3, **end)
        if step_losses.get(trial.trial_id):
            right.plot(*zip(*step_losses[trial.trial_id]), color=color, linestyle=style, alpha=0.7, linewidth=1)
    left.axvline(budget.reports, color="grey", linestyle=":")
    left.annotate(f"common budget: {budget}", (budget.reports, 1.0), xycoords=("data", "axes fraction"),
                  xytext=(4, -12), textcoords="offset points", fontsize=8, color="grey")  # fmt: skip
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("epochs trained" if budget.unit == "epoch" else "evaluations")
    left.set_ylabel(metric)
    left.set_title(f"{metric}, one line per trial", fontsize=10)
    left.grid(alpha=0.3)
    right.set_xlabel("optimizer step")
    right.set_ylabel("training loss")
    right.set_title(f"training loss every {spec.training.log_every_steps} optimizer steps", fontsize=10)
    right.grid(alpha=0.3)
    if not any(step_losses.values()):
        right.text(0.5, 0.5, "no per-step loss in MLflow", ha="center", va="center", transform=right.transAxes)
    extra = [
        Line2D([], [], color="grey", linestyle=style, label=setting)
        for setting, style in styles.items()
        if setting != MISSING
    ]
    if any(trial.stopped_early for trial in scored):
        extra.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="",
                            label="hollow end: stopped early by ASHA"))  # fmt: skip
    arm_legend(right, colors, extra)
    figure.savefig(path, dpi=120)


COST_COLORS = {"startup": "#9e9e9e", "warmup": "#f2a541", "training": "#2e7d32", "evaluation": "#1565c0",
               "checkpointing": "#8e24aa", "teardown": "#6d4c41", "other": "#e0e0e0"}  # fmt: skip


def plot_cost(trials: Sequence[TrialOutcome], path: Path) -> None:
    """Each trial's wall time as one bar split into its parts (:data:`pipeline.results.outcomes.COST_PARTS`), labelled with
    its arm, longest first; GPU-seconds when the trials held GPUs."""
    recorded = sorted((trial for trial in trials if trial.cost), key=lambda trial: trial.cost["wall"])
    gpus = any(trial.cost["gpus"] for trial in recorded)
    figure = new_figure(11, 1.2 + 0.45 * len(recorded))
    axes = figure.add_subplot()
    labels = [
        f"{trial.trial_id}  {arm_of(trial).label}" + (" (stopped)" if trial.stopped_early else "") for trial in recorded
    ]
    left = [0.0] * len(recorded)
    for part in COST_PARTS:
        seconds = [max(0.0, trial.cost.get(part, 0.0)) * (trial.cost["gpus"] or 1.0) for trial in recorded]
        axes.barh(labels, seconds, left=left, color=COST_COLORS[part], label=part, edgecolor="white", linewidth=0.5)
        left = [a + b for a, b in zip(left, seconds)]
    axes.set_xlabel("GPU-seconds" if gpus else "seconds")
    axes.set_title("Where each trial's time went", fontsize=10)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=120)


# -- the report -----------------------------------------------------------------------------------------------


def log_to_parent_run(
    spec: JobSpec, tracker: SweepTracker, folder: Path, costs: Mapping[str, float], log: Callable[[str], Any]
) -> None:
    """The report as the parent run's ``report/`` artifacts, and the GPU-time totals as its ``cost/*`` metrics."""
    parent = tracker.find_sweep()
    if parent is None:
        logger.warning("no MLflow run for sweep %s: the report is not logged to MLflow", spec.sweep_dir)
        return
    tracker.client.log_artifacts(parent, str(folder), REPORT_DIR)
    if costs["wall"] > 0:
        metrics = {f"cost/total_{part}_s": seconds for part, seconds in costs.items()}
        metrics.update({f"cost/{part}_fraction": costs[part] / costs["wall"] for part in COST_PARTS})
        tracker.log_run_metrics(parent, metrics)
    log(f"logged as {REPORT_DIR}/ of MLflow run {parent}")


def write_report(
    spec: JobSpec,
    trials: list[TrialOutcome],
    tracker: SweepTracker,
    out: str | StoragePath | None = None,
    log: Callable[[str], Any] = print,
) -> StoragePath:
    """Writes the report of the sweep's ``trials`` to ``out`` (``<sweep dir>/report`` by default, replaced whole),
    logs it to the sweep's MLflow parent run when there is one, and returns the folder. The trials' per-report
    history comes from their MLflow runs. Raises :class:`NoUsableTrialError` when no trial finished with a finite
    metric."""
    out = spec.sweep_dir.resolve() / REPORT_DIR if out is None else storage_path(out)
    curves = metric_curves(spec, trials, tracker)
    step_losses = {trial_id: tracker.metric_history(trial_id, STEP_LOSS) for trial_id in curves}
    rows, budget = arm_summaries(spec, trials, curves)
    table, verdicts, cost = summary_table(spec, rows, budget), baseline_verdicts(spec, rows, budget), cost_table(trials)
    colors = arm_colors([trial for trial in trials if trial.trial_id in curves])

    def write(folder: Path) -> None:
        plots = [CURVES_PNG]
        plot_learning_curves(spec, trials, curves, step_losses, budget, colors, folder / CURVES_PNG)
        if any(trial.cost for trial in trials):
            plot_cost(trials, folder / COST_PNG)
            plots.append(COST_PNG)
        for key, domain in spec.search.space.items():
            plot_hyperparameter(spec, key, domain, trials, curves, budget, colors, folder / plot_name(key))
            plots.append(plot_name(key))
        (folder / SUMMARY_MD).write_text(summary_markdown(spec, trials, table, verdicts, cost, budget, plots))
        write_csv(spec, rows, budget, folder / SUMMARY_CSV)
        write_trials_csv(spec, trials, folder / TRIALS_CSV)

    write_directory(out, write, marker=SUMMARY_MD)
    log(f"report written to {out}")
    wrapped = "\n\n".join(textwrap.fill(paragraph, CONSOLE_WIDTH) for paragraph in verdicts.split("\n\n"))
    log(f"{table}\n\n{wrapped}\n\nWhere the time went:\n{cost}")
    with local_copy(out) as folder:
        log_to_parent_run(spec, tracker, folder, cost_totals(trials), log)
    return out


__all__ = ["ArmSummary", "Stats", "arm_summaries", "baseline_verdicts", "write_report"]
