"""The verdicts of a report: each method that names a baseline in ``sdt.METHODS`` against it, at the common budget,
saying whether the difference is inside the seeds' spread."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sdt
from pipeline.results.arm_summaries import ArmSummary, Budget, epochs_text, pooled_std
from pipeline.results.outcomes import (
    metric_on_test,
)
from pipeline.spec.job import JobSpec

logger = logging.getLogger(__name__)


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
            f"No {ours_title} vs {theirs_title} comparison at equal budget: ASHA stopped trials early, and their "
            f"{metric} after {budget} is not in the trials' per-evaluation history (their MLflow runs)."
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
