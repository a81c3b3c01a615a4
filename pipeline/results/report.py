"""The report of a sweep, read back with no Ray cluster running, written to ``<sweep dir>/report`` and logged as
the ``report/`` artifacts of the sweep's MLflow parent run: a "best vs baselines" table (the arms at equal budgets,
:mod:`pipeline.results.arm_summaries`) and the verdicts (:mod:`pipeline.results.verdicts`), learning curves, the
metric against every searched hyperparameter and where the time went (:mod:`pipeline.results.plots`), as Markdown,
CSV and PNG files.

Each trial counts by its last report, as in :mod:`pipeline.results.outcomes`; failed trials and trials without a
finite metric are left out, and counted. Finished trials fall into *arms* (:mod:`pipeline.results.arms`), and within
an arm into *settings* of the other searched hyperparameters. Seeds (``training.seed``) are repetitions of a
setting, not part of it: an arm is represented by its setting with the best mean validation metric over seeds, and
the test metric is read for that setting only, so the test split never picks anything.

Arms are compared at equal budgets. ASHA stops trials early, so the last reports of two arms can stand for 3 epochs
against 1: the *common budget* is the most epochs (optimizer steps, when trials evaluate within epochs too) that
every arm reached with at least one trial, and the ranking and the verdicts (in a sweep of three or more methods, the
best method against each other one; a method against the baseline it names in ``sdt.METHODS``: SDLoRA against LoRA) use each arm's best setting at that budget, read from the per-report history
the trials' MLflow runs hold, each evaluation keyed by its epoch (or step), never by its place in the history. The
last-report and test columns, the epochs each setting reached and how many trials
the scheduler stopped are shown beside it. Only when the compared settings all trained to the end does the verdict
use their last reports (and the test metric).
"""

from __future__ import annotations

import csv
import logging
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.results.arm_summaries import (
    MISSING,
    STEP_LOSS,
    ArmSummary,
    Budget,
    arm_summaries,
    epochs_text,
    exclusion_note,
    metric_curves,
    setting_keys,
    setting_text,
)
from pipeline.results.arms import arm_of, canonical
from pipeline.results.costs import SWEEP_PARTS, TRIAL_PARTS, cost_table, cost_totals, driver_runs
from pipeline.results.outcomes import (
    TUNE_ERROR,
    TrialOutcome,
    exception_line,
    metric_on_test,
)
from pipeline.results.plots import arm_colors, plot_cost, plot_hyperparameter, plot_learning_curves, plot_name
from pipeline.results.tracking import SweepTracker
from pipeline.results.verdicts import sweep_verdicts
from pipeline.spec.job import JobSpec
from pipeline.storage.paths import StoragePath, local_copy, storage_path, write_directory

logger = logging.getLogger(__name__)

REPORT_DIR = "report"  # under the sweep directory, and the artifact path in the parent run
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
TRIALS_CSV = "trials.csv"
CURVES_PNG = "learning_curves.png"
COST_PNG = "time.png"
CONSOLE_WIDTH = 110  # the verdict and notes are wrapped to this on the console
# Columns of trials.csv besides the searched values: the last report's, where present.
TRIAL_COLUMNS = (
    "step",
    "epoch",
    "train/loss",
    "trainable_parameters",
    "tokens_per_s",
    "batching",
    "train/padding",
    "train/truncated_examples",
    "peak_memory_gib",
    "warmup/shared",
)


# -- values and labels ----------------------------------------------------------------------------------------


def failures_text(trials: Sequence[TrialOutcome]) -> str:
    """One line per failed trial: its arm and why it failed (a diverged loss, an error)."""
    failed = [trial for trial in trials if trial.status == TUNE_ERROR]
    if not failed:
        return "None."
    return "\n".join(f"- `{t.trial_id}` ({arm_of(t).label}): {t.error or 'unknown error'}" for t in failed)


# -- best vs baselines ----------------------------------------------------------------------------------------


# -- equal budgets --------------------------------------------------------------------------------------------


# -- the summary files ----------------------------------------------------------------------------------------


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
            held_out_cell(row), count_text(row.trainable_parameters), count_text(row.tokens_per_s),
            setting_text(row.setting),
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
    if costs["all"] > 0:
        metrics = {f"cost/total_{part}_s": seconds for part, seconds in costs.items()}
        metrics.update({f"cost/{part}_fraction": costs[part] / costs["all"] for part in (*TRIAL_PARTS, *SWEEP_PARTS)})
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
    logs it to the sweep's MLflow parent run when there is one (a failure there is a warning), and returns the
    folder. The trials' per-report
    history comes from their MLflow runs. Raises :class:`NoUsableTrialError` when no trial finished with a finite
    metric."""
    out = spec.sweep_dir.resolve() / REPORT_DIR if out is None else storage_path(out)
    curves = metric_curves(spec, trials, tracker)
    step_losses = {trial_id: tracker.metric_history(trial_id, STEP_LOSS) for trial_id in curves}
    rows, budget = arm_summaries(spec, trials, curves)
    runs = driver_runs(spec.sweep_dir)
    table, verdicts = summary_table(spec, rows, budget), sweep_verdicts(spec, rows, budget)
    cost = cost_table(trials, runs)
    colors = arm_colors([trial for trial in trials if trial.trial_id in curves])

    def write(folder: Path) -> None:
        plots = [CURVES_PNG]
        plot_learning_curves(spec, trials, curves, step_losses, budget, colors, folder / CURVES_PNG)
        if any(trial.cost for trial in trials):
            plot_cost(trials, runs, folder / COST_PNG)
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
    try:
        with local_copy(out) as folder:
            log_to_parent_run(spec, tracker, folder, cost_totals(trials, runs), log)
    except Exception as error:  # the report is written: MLflow's copy of it is not worth failing the sweep for
        logger.warning("%s is written, but not logged to MLflow: %s", out, exception_line(error), exc_info=error)
    return out


__all__ = ["write_report"]
