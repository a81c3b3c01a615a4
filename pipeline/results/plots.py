"""The report's plots (matplotlib, headless with Agg): the metric against every searched hyperparameter, the
learning curves of every trial, and where each trial's time went."""

from __future__ import annotations

import logging
import random
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.results.arm_summaries import MISSING, Budget, Curves, exclusion_note, setting_keys, setting_text
from pipeline.results.arms import arm_of, canonical, value_label
from pipeline.results.costs import PART_NAMES, SWEEP_PARTS, TRIAL_PARTS, sweep_idle, weight
from pipeline.results.outcomes import TrialOutcome
from pipeline.results.tracking import is_finite_number
from pipeline.spec.job import Domain, JobSpec

logger = logging.getLogger(__name__)

TICK_WIDTH = 22  # characters per line of a category's label under its tick
LOG_SPAN = 10  # positive values spanning this factor or more are drawn on a log axis
JITTER = 0.15  # half-width of the spread of points around a category, so repeated seeds do not hide each other
COST_COLORS = {"startup": "#9e9e9e", "warmup": "#f2a541", "training": "#2e7d32", "padding": "#a5d6a7",
               "evaluation": "#1565c0", "checkpointing": "#8e24aa", "teardown": "#6d4c41", "other": "#e53935",
               "idle": "#ffcc80", "unused": "#e0e0e0"}  # fmt: skip


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
        if budget.at in curve:
            axes.scatter(
                [position], [curve[budget.at]], color=color, edgecolors="black", linewidths=0.5, s=45, zorder=3
            )
        if max(curve) > budget.at:
            start = curve.get(budget.at, end)
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
    left.axvline(budget.at, color="grey", linestyle=":")
    left.annotate(f"common budget: {budget}", (budget.at, 1.0), xycoords=("data", "axes fraction"),
                  xytext=(4, -12), textcoords="offset points", fontsize=8, color="grey")  # fmt: skip
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("epochs trained" if budget.unit == "epoch" else "optimizer step")
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


def plot_cost(trials: Sequence[TrialOutcome], runs: Sequence[Mapping[str, float]], path: Path) -> None:
    """Each trial's wall time as one bar split into its parts (:data:`pipeline.results.costs.TRIAL_PARTS`), labelled
    with its arm, longest first, and one bar per driver run for its GPU time no trial held (idle between trials,
    reserved but unused); GPU-seconds when the trials held GPUs. A negative part (a rest where parts counted the same
    seconds twice) is drawn left of zero, not hidden."""
    recorded = sorted((trial for trial in trials if trial.cost), key=lambda trial: trial.cost["wall"])
    labels = [
        f"{trial.trial_id}  {arm_of(trial).label}" + (" (stopped)" if trial.stopped_early else "") for trial in recorded
    ]
    rows = [{part: trial.cost.get(part, 0.0) * weight(trial.cost) for part in TRIAL_PARTS} for trial in recorded]
    idle = sweep_idle(runs, [trial.cost for trial in recorded])
    labels += [f"driver run {number}: no trial" for number in range(1, len(idle) + 1)]
    rows += [{part: run[part] for part in SWEEP_PARTS} for run in idle]
    figure = new_figure(11, 1.2 + 0.45 * len(rows))
    axes = figure.add_subplot()
    ends = [[0.0, 0.0] for _ in rows]  # per row: how far its bar reaches right of zero, and left of it
    for part in (*TRIAL_PARTS, *SWEEP_PARTS):
        values = [row.get(part, 0.0) for row in rows]
        starts = [end[0] if value >= 0 else end[1] for value, end in zip(values, ends)]
        axes.barh(labels, values, left=starts, color=COST_COLORS[part], label=PART_NAMES.get(part, part),
                  edgecolor="white", linewidth=0.5)  # fmt: skip
        for value, end in zip(values, ends):
            end[value < 0] += value
    if any(end[1] < 0 for end in ends):
        axes.axvline(0.0, color="black", linewidth=0.8)
    gpus = any(trial.cost["gpus"] for trial in recorded)
    axes.set_xlabel("GPU-seconds" if gpus else "seconds")
    axes.set_title("Where the sweep's time went", fontsize=10)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=120)
