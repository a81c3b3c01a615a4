"""The verdicts of a report: each method that names a baseline in ``sdt.METHODS`` against it, at the common budget,
saying whether the difference is inside the seeds' spread."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import sdt
from pipeline.results.arm_summaries import ArmSummary, Budget, Stats, epochs_text, pooled_std
from pipeline.results.outcomes import metric_on_test
from pipeline.spec.job import JobSpec

logger = logging.getLogger(__name__)


def baseline_verdicts(spec: JobSpec, rows: Sequence[ArmSummary], budget: Budget) -> str:
    """The :func:`verdict` of each method that names a baseline (``sdt.Method.baseline``: SDLoRA's is LoRA) and of
    which the sweep finished an arm; where it finished none, of the first such method (in the registry's order)
    whose baseline it finished, or else of the first such method: one paragraph each."""
    pairs = [(name, method.baseline) for name, method in sdt.METHODS.items() if method.baseline]
    present = {row.arm.method for row in rows}
    compared = (
        [pair for pair in pairs if pair[0] in present]
        or [pair for pair in pairs if pair[1] in present][:1]
        or pairs[:1]
    )
    return "\n\n".join(verdict(spec, rows, budget, method, baseline) for method, baseline in compared)


def method_title(method: str) -> str:
    """How people write the method's name (``SDLoRA``); a baseline nobody registered goes by its name."""
    return sdt.METHODS[method].title if method in sdt.METHODS else method


@dataclass(frozen=True)
class Comparison:
    """Two arms' best settings on a common footing: the value compared, when, and the two groups of seeds."""

    compared: str  # the metric compared (its test form where both have it)
    where: str  # "after the whole training" or "at equal budget, after <budget> each"
    ours: Stats
    theirs: Stats
    note: str  # why the last reports are not compared, where ASHA stopped trials

    def difference(self) -> float:
        return self.ours.mean - self.theirs.mean

    def beats(self, mode: str) -> bool:
        return self.difference() > 0 if mode == "max" else self.difference() < 0

    def inside_spread(self) -> bool | None:
        """Whether the difference is smaller than the seeds' pooled standard deviation; None with one seed each."""
        spread = pooled_std(self.ours, self.theirs)
        return None if spread is None else abs(self.difference()) < spread

    def spread_text(self) -> str:
        """The difference in pooled standard deviations of the seeds, and whether it is inside their spread."""
        spread = pooled_std(self.ours, self.theirs)
        if spread is None:
            return "the spread over seeds is unknown (one seed each)"
        if spread == 0:
            return "with no spread over seeds"
        relative = f"{abs(self.difference()) / spread:.2g} pooled standard deviations"
        if self.inside_spread():
            relative += ": within the spread over seeds, not a clear difference"
        return relative

    def figures(self) -> str:
        return (
            f"on {self.compared} {self.where}: {self.ours} (n={self.ours.n}) vs {self.theirs} (n={self.theirs.n}), a "
            f"difference of {self.difference():+.4g}, {self.spread_text()}"
        )


def compare(spec: JobSpec, ours: ArmSummary, theirs: ArmSummary, budget: Budget) -> Comparison | str:
    """When both arms' chosen settings trained to the end, their test metric means (validation when either lacks
    one); otherwise, when ASHA stopped one of them, the validation metric of each arm's best setting at the common
    ``budget``. A str says why the two cannot be compared."""
    metric = spec.search.metric
    if ours.finished and theirs.finished and ours.epochs == theirs.epochs:
        if ours.test and theirs.test:
            return Comparison(metric_on_test(metric), "after the whole training", ours.test, theirs.test, "")
        return Comparison(metric, "after the whole training", ours.validation, theirs.validation, "")
    if ours.at_budget is None or theirs.at_budget is None:
        return (
            f"ASHA stopped trials early, and their {metric} after {budget} is not in the trials' per-evaluation "
            "history (their MLflow runs)"
        )
    ours_title, theirs_title = method_title(ours.arm.method), method_title(theirs.arm.method)
    note = (
        f" ASHA stopped trials early ({ours_title}'s best setting reached {epochs_text(ours)} epochs, "
        f"{theirs_title}'s {epochs_text(theirs)}), so their last reports and test scores are not compared."
    )
    return Comparison(metric, f"at equal budget, after {budget} each", ours.at_budget, theirs.at_budget, note)


def best_row(rows: Sequence[ArmSummary], method: str) -> ArmSummary | None:
    """The method's best arm: rows come best first."""
    return next((row for row in rows if row.arm.method == method), None)


def verdict(spec: JobSpec, rows: Sequence[ArmSummary], budget: Budget, method: str, baseline: str) -> str:
    """Whether the best arm of ``method`` beats the best arm of ``baseline``, at equal budgets (:func:`compare`), and
    by how many pooled standard deviations."""
    ours_title, theirs_title = method_title(method), method_title(baseline)
    ours_row, theirs_row = best_row(rows, method), best_row(rows, baseline)
    if ours_row is None or theirs_row is None:
        missing = " and ".join(name for name, row in ((method, ours_row), (baseline, theirs_row)) if row is None)
        return (
            f"No {ours_title} vs {theirs_title} comparison: no {missing} trial finished with a finite "
            f"{spec.search.metric}."
        )
    comparison = compare(spec, ours_row, theirs_row, budget)
    if isinstance(comparison, str):
        return f"No {ours_title} vs {theirs_title} comparison at equal budget: {comparison}."
    beats = "beats" if comparison.beats(spec.search.mode) else "does not beat"
    return (
        f"{ours_title} {beats} the best {theirs_title} arm ({theirs_row.arm.label}) {comparison.figures()}."
        f"{comparison.note}"
    )


def method_ranking(spec: JobSpec, rows: Sequence[ArmSummary], budget: Budget) -> str:
    """Which method wins a sweep of more than two methods: the method of the best arm against every other method's
    best arm (:func:`compare`), each said to be a clear difference or inside the seeds' spread. One paragraph;
    empty for fewer than three methods, which the baseline verdicts cover."""
    methods = list(dict.fromkeys(row.arm.method for row in rows))  # best first
    if len(methods) < 3:
        return ""
    leader = best_row(rows, methods[0])
    assert leader is not None
    title = method_title(leader.arm.method)
    sentences = [f"Best method: {title} ({leader.arm.label}), against each other method's best arm:"]
    clear = 0
    for method in methods[1:]:
        other = best_row(rows, method)
        assert other is not None
        comparison = compare(spec, leader, other, budget)
        if isinstance(comparison, str):
            sentences.append(f"not compared with {method_title(method)}: {comparison};")
            continue
        ahead = comparison.beats(spec.search.mode)
        clear += ahead and comparison.inside_spread() is False
        sentences.append(f"{'ahead of' if ahead else 'not ahead of'} {method_title(method)} {comparison.figures()};")
    sentences.append(f"{title} is clearly ahead (beyond the seeds' spread) of {clear} of {len(methods) - 1}.")
    return " ".join(sentences)


def sweep_verdicts(spec: JobSpec, rows: Sequence[ArmSummary], budget: Budget) -> str:
    """The report's verdicts: which method wins (:func:`method_ranking`), then each method against its baseline."""
    return "\n\n".join(filter(None, [method_ranking(spec, rows, budget), baseline_verdicts(spec, rows, budget)]))
