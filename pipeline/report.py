"""The report of a sweep, read back with no Ray cluster running: the metric plotted against every searched
hyperparameter, and a "best vs baselines" table, written to ``<sweep dir>/report`` and logged as the ``report/``
artifacts of the sweep's MLflow parent run.

Each trial counts by its last report, as in :mod:`pipeline.results`; failed trials and trials without a finite
metric are left out, and counted. Finished trials fall into *arms*, one per fine-tuning method (one per distinct
method mapping when the sweep searches ``method`` whole), and within an arm into *settings* of the other searched
hyperparameters. Seeds (``training.seed``) are repetitions of a setting, not part of it: an arm is represented by
its setting with the best mean validation metric over seeds, and the test metric is read for that setting only, so
the test split never picks anything.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.config import Domain, JobSpec
from pipeline.results import COST_PARTS, TUNE_ERROR, TUNE_TERMINATED, NoUsableTrialError, TrialOutcome
from pipeline.storage import StoragePath, local_copy, storage_path, write_directory
from pipeline.tracking import SweepTracker, is_finite_number

logger = logging.getLogger(__name__)

REPORT_DIR = "report"  # under the sweep directory, and the artifact path in the parent run
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
TRIALS_CSV = "trials.csv"
# Columns of trials.csv besides the searched values: the last report's, where present.
TRIAL_COLUMNS = ("step", "epoch", "train/loss", "trainable_parameters", "tokens_per_s", "peak_memory_gib", "warmup/shared")
SEED_KEY = "training.seed"
METHOD_KEYS = ("method", "method.name")  # searched keys that pick the arm rather than a setting within it
SDLORA, LORA = "sdlora", "lora"
LOG_SPAN = 10  # positive values spanning this factor or more are drawn on a log axis
JITTER = 0.15  # half-width of the spread of points around a category, so repeated seeds do not hide each other
# Method fields that tell arms apart, in label order, with their short prefix ("lora r2 out_proj+x_proj").
LABEL_PREFIXES = {"lora_rank": "r", "lora_targets": "", "channels_frozen": "ch", "states_frozen": "st"}
MISSING = "–"


@dataclass(frozen=True)
class Arm:
    key: str  # what identifies it: the method name, or the canonical JSON of a searched method mapping
    label: str
    method: str  # the method name


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
class ArmSummary:
    arm: Arm
    setting: dict[str, Any]  # the chosen values of the searched hyperparameters, except the method and the seed
    validation: Stats
    test: Stats | None
    trainable_parameters: float | None
    tokens_per_s: float | None
    best: bool = False


# -- values and labels ----------------------------------------------------------------------------------------


def number(value: float) -> str:
    return f"{value:.4g}"


def canonical(value: Any) -> str:
    """One string per distinct value, also for the unhashable ones (lists, mappings)."""
    return json.dumps(value, sort_keys=True, default=str)


def value_label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "+".join(value_label(item) for item in value) if value else "[]"
    if isinstance(value, Mapping):
        return " ".join(f"{key}={value_label(item)}" for key, item in value.items())
    return str(value)


def method_label(name: str, method: Mapping[str, Any]) -> str:
    """``lora r2 out_proj+x_proj``: the name, then every other field that is set, the common ones briefly."""
    others = sorted(set(method) - set(LABEL_PREFIXES) - {"name"})
    parts = [name]
    for field in [field for field in LABEL_PREFIXES if field in method] + others:
        if method[field] is not None:
            parts.append(LABEL_PREFIXES.get(field, f"{field}=") + value_label(method[field]))
    return " ".join(parts)


def arm_of(trial: TrialOutcome) -> Arm:
    """The trial's arm: its method, or the whole method mapping it sampled when the sweep searches ``method``."""
    name = trial.spec.method.name
    mapping = trial.config.get("method")
    if isinstance(mapping, Mapping):
        return Arm(canonical(mapping), method_label(name, mapping), name)
    return Arm(name, name, name)


def metric_on_test(metric: str) -> str:
    """``eval/accuracy`` -> ``test/accuracy``."""
    return f"test/{metric.split('/', 1)[-1]}"


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


def best_setting(spec: JobSpec, settings: Sequence[list[TrialOutcome]]) -> list[TrialOutcome]:
    """The seeds of the setting with the best mean validation metric (the first of equals)."""
    metric = spec.search.metric
    pick = max if spec.search.mode == "max" else min
    return pick(settings, key=lambda seeds: statistics.mean(trial.score(metric) for trial in seeds))


def summarize(spec: JobSpec, arm: Arm, seeds: list[TrialOutcome]) -> ArmSummary:
    metric = spec.search.metric
    validation = Stats.of([trial.score(metric) for trial in seeds])
    assert validation is not None  # a setting holds at least one scored trial
    return ArmSummary(
        arm=arm,
        setting={key: seeds[0].config.get(key) for key in setting_keys(spec)},
        validation=validation,
        test=Stats.of(finite_values(seeds, metric_on_test(metric))),
        trainable_parameters=mean_or_none(finite_values(seeds, "trainable_parameters")),
        tokens_per_s=mean_or_none(finite_values(seeds, "tokens_per_s")),
    )


def arm_summaries(spec: JobSpec, trials: Sequence[TrialOutcome]) -> list[ArmSummary]:
    """One row per arm, best validation mean first and marked ``best``; failed and NaN trials are left out."""
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
    rows = [
        summarize(spec, arms[key], best_setting(spec, list(by_setting.values())))
        for key, by_setting in settings.items()
    ]
    rows.sort(key=lambda row: row.validation.mean, reverse=spec.search.mode == "max")
    return [replace(rows[0], best=True), *rows[1:]]


def pooled_std(a: Stats, b: Stats) -> float | None:
    """The pooled sample standard deviation of two groups; None when neither has two values."""
    degrees = a.n + b.n - 2
    if degrees < 1:
        return None
    squares = (a.n - 1) * (a.std or 0.0) ** 2 + (b.n - 1) * (b.std or 0.0) ** 2
    return math.sqrt(squares / degrees)


def sdlora_verdict(spec: JobSpec, rows: Sequence[ArmSummary]) -> str:
    """Whether the best SDLoRA arm beats the best LoRA arm (both picked by validation) on the test metric mean,
    or on the validation metric when either lacks a test metric, and by how many pooled standard deviations."""
    sdlora = next((row for row in rows if row.arm.method == SDLORA), None)
    lora = next((row for row in rows if row.arm.method == LORA), None)
    if sdlora is None or lora is None:
        missing = " and ".join(name for name, row in ((SDLORA, sdlora), (LORA, lora)) if row is None)
        return f"No SDLoRA vs LoRA comparison: no {missing} trial finished with a finite {spec.search.metric}."
    if sdlora.test and lora.test:
        metric, ours, theirs = metric_on_test(spec.search.metric), sdlora.test, lora.test
    else:
        metric, ours, theirs = spec.search.metric, sdlora.validation, lora.validation
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
        f"SDLoRA {'beats' if beats else 'does not beat'} the best LoRA arm ({lora.arm.label}) on {metric}: "
        f"{ours} (n={ours.n}) vs {theirs} (n={theirs.n}), a difference of {difference:+.4g}, {relative}."
    )


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


def summary_table(spec: JobSpec, rows: Sequence[ArmSummary]) -> str:
    metric = spec.search.metric
    header = ["arm", "seeds", metric, metric_on_test(metric), "trainable parameters", "tokens/s", "hyperparameters"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        arm = f"**{row.arm.label}** (best)" if row.best else row.arm.label
        cells = [
            arm, str(row.validation.n), str(row.validation), held_out_cell(row),
            count_text(row.trainable_parameters), count_text(row.tokens_per_s), setting_text(row.setting),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(spec: JobSpec, trials: Sequence[TrialOutcome], table: str, verdict: str, cost: str) -> str:
    metric, mode = spec.search.metric, spec.search.mode
    plots = "\n".join(f"![{key}]({plot_name(key)})" for key in spec.search.space)
    return (
        f"# Sweep report: {spec.name}\n\n"
        f"`{metric}` ({mode}) from the last report of each trial: {exclusion_note(metric, trials)}.\n\n"
        "## Best vs baselines\n\n"
        f"Per arm, the setting of the searched hyperparameters with the best mean `{metric}` over seeds; mean ± "
        f"sample standard deviation over its seeds ({MISSING} for one seed), and `{metric_on_test(metric)}` of that "
        "setting.\n\n"
        f"{table}\n\n{verdict}\n\n## Failed trials\n\n{failures_text(trials)}\n\n"
        f"## Where the GPU time went\n\n{cost}\n\n## Plots\n\n{plots}\n"
    )


# -- the GPU-time breakdown -----------------------------------------------------------------------------------


def cost_totals(trials: Sequence[TrialOutcome]) -> dict[str, float]:
    """Seconds per part summed over the trials that have a cost record, weighted by the GPUs each held (device
    seconds; plain seconds when the trials held no GPU), and ``wall``, the trials' summed wall time so weighted."""
    recorded = [trial.cost for trial in trials if trial.cost]
    totals = {part: 0.0 for part in ("wall", *COST_PARTS)}
    for cost in recorded:
        weight = cost["gpus"] or 1.0
        for part in totals:
            totals[part] += cost.get(part, 0.0) * weight
    return totals


def cost_table(trials: Sequence[TrialOutcome]) -> str:
    """One row per trial with a cost record (seconds per part) and a total row with each part's share."""
    recorded = [trial for trial in trials if trial.cost]
    if not recorded:
        return "No trial of this sweep has a cost record (the sweep driver writes one per trial as it ends)."
    unit = "GPU-s" if any(trial.cost["gpus"] for trial in recorded) else "s"
    header = ["trial", "arm", "GPUs", "wall s", *(f"{part} s" for part in COST_PARTS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial in recorded:
        cost = trial.cost
        cells = [trial.trial_id, arm_of(trial).label, f"{cost['gpus']:g}", f"{cost['wall']:.1f}"]
        cells += [f"{cost.get(part, 0.0):.1f}" for part in COST_PARTS]
        lines.append("| " + " | ".join(cells) + " |")
    totals = cost_totals(recorded)
    shares = [f"{totals[part]:.0f} ({totals[part] / totals['wall']:.0%})" for part in COST_PARTS]
    lines.append("| " + " | ".join([f"**total ({unit})**", "", "", f"{totals['wall']:.0f}", *shares]) + " |")
    return "\n".join(lines)


def csv_cell(value: Any) -> Any:
    """Numbers as they are (full precision), lists and mappings as JSON, missing as empty."""
    if value is None:
        return ""
    return canonical(value) if isinstance(value, list | tuple | Mapping) else value


def write_csv(spec: JobSpec, rows: Sequence[ArmSummary], path: Path) -> None:
    metric, test = spec.search.metric, metric_on_test(spec.search.metric)
    keys = setting_keys(spec)
    header = [
        "arm", "method", "best", "seeds", f"{metric} mean", f"{metric} std", f"{test} mean", f"{test} std",
        "trainable_parameters", "tokens_per_s", *keys,
    ]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for row in rows:
            test_stats = [row.test.mean, row.test.std] if row.test else [None, None]
            values = [
                row.arm.label, row.arm.method, row.best, row.validation.n, row.validation.mean, row.validation.std,
                *test_stats, row.trainable_parameters, row.tokens_per_s, *(row.setting[key] for key in keys),
            ]
            writer.writerow([csv_cell(value) for value in values])


def write_trials_csv(spec: JobSpec, trials: Sequence[TrialOutcome], path: Path) -> None:
    """One row per trial, failed ones included: its status, searched values and last report's numbers."""
    metric, test = spec.search.metric, metric_on_test(spec.search.metric)
    keys = list(spec.search.space)
    columns = [metric, test, *(c for c in TRIAL_COLUMNS if any(c in t.metrics for t in trials))]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial_id", "status", *keys, *columns, "error"])
        for trial in trials:
            values = [trial.trial_id, trial.status, *(trial.config.get(k) for k in keys)]
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
    # Arm labels are long ("lora r6 out_proj+dt_proj lora_alpha=6"): slanted and anchored at their tick.
    axes.set_xticks(range(len(categories)), labels, rotation=25, ha="right", rotation_mode="anchor")
    axes.set_xlim(-0.5, len(categories) - 0.5)
    jitter = random.Random(0)  # the same picture on every run
    return [index[canonical(value)] + jitter.uniform(-JITTER, JITTER) for value in values]


def plot_hyperparameter(spec: JobSpec, key: str, domain: Domain, trials: Sequence[TrialOutcome], path: Path) -> None:
    """The metric of each finished trial against its value of ``key``, colored by method when there are several."""
    metric = spec.search.metric
    scored = [trial for trial in trials if trial.score(metric) is not None]
    values = [trial.config.get(key) for trial in scored]
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without pyplot: no display, and no process-wide backend to switch
    axes = figure.add_subplot()
    if all(is_finite_number(value) for value in values):
        positions = [float(value) for value in values]
        if wants_log_axis(domain, positions):
            axes.set_xscale("log")
    else:
        positions = categorical_positions(key, domain, scored, values, axes)
    methods = sorted({trial.spec.method.name for trial in scored})
    for color, method in enumerate(methods):
        mine = [i for i, trial in enumerate(scored) if trial.spec.method.name == method]
        points = ([positions[i] for i in mine], [scored[i].score(metric) for i in mine])
        axes.scatter(*points, color=f"C{color}", alpha=0.75, edgecolors="black", linewidths=0.5, label=method)
    if len(methods) > 1:
        axes.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, never over points
    axes.set_xlabel(key)
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.set_title(f"{metric} vs {key}\n{exclusion_note(metric, trials)}", fontsize=10)
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
    logs it to the sweep's MLflow parent run when there is one, and returns the folder. Raises
    :class:`NoUsableTrialError` when no trial finished with a finite metric."""
    out = spec.sweep_dir.resolve() / REPORT_DIR if out is None else storage_path(out)
    rows = arm_summaries(spec, trials)
    table, verdict, cost = summary_table(spec, rows), sdlora_verdict(spec, rows), cost_table(trials)

    def write(folder: Path) -> None:
        for key, domain in spec.search.space.items():
            plot_hyperparameter(spec, key, domain, trials, folder / plot_name(key))
        (folder / SUMMARY_MD).write_text(summary_markdown(spec, trials, table, verdict, cost))
        write_csv(spec, rows, folder / SUMMARY_CSV)
        write_trials_csv(spec, trials, folder / TRIALS_CSV)

    write_directory(out, write, marker=SUMMARY_MD)
    log(f"report written to {out}")
    log(f"{table}\n\n{verdict}\n\nWhere the GPU time went:\n{cost}")
    with local_copy(out) as folder:
        log_to_parent_run(spec, tracker, folder, cost_totals(trials), log)
    return out


__all__ = ["ArmSummary", "Stats", "arm_summaries", "sdlora_verdict", "write_report"]
