"""The task vocabulary: the splits, column roles and file formats every task shares, the metrics of each kind of
task, and the task registry (``TASKS``), what ``data.task`` may name.

A :class:`Task` says what a task answers (its kind and metrics), what the spec must give it (:class:`Need`), where
its splits come from, and what preflight and export read from it without loading data. The job spec, the trial's
data loading, preflight and export ask the registry instead of comparing task names, so a new task is one module
that calls :func:`register_task`: one of ``pipeline/tasks/builtin/`` (imported by ``pipeline.tasks``), or a user's,
named in the job spec's ``imports``.

Light on purpose: the job spec imports it, so nothing here imports datasets or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import datasets

    from pipeline.spec.job import DataSpec

DATA_SPLITS: tuple[str, ...] = ("train", "validation", "test")
COLUMN_ROLES: tuple[str, ...] = ("text", "text_pair", "label", "target")
# File suffix -> the `datasets` builder that reads it.
DATA_FILE_FORMATS: dict[str, str] = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

Kind = Literal["classification", "generation"]
# The keys `pipeline.tasks.metrics.evaluate` returns for each kind; the first leads unless the task names another.
METRICS: dict[Kind, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "matthews", "out_of_label", "loss"),
    "generation": ("rouge1", "rouge2", "rougeL", "bleu", "exact_match", "loss"),
}

# train / validation / test, before max_train_samples / max_eval_samples; test is None when the source has none.
Splits = dict[str, "datasets.Dataset | None"]


@dataclass(frozen=True)
class Need:
    """A field the spec's data section must set for a task: where ``met(data)`` is false, the spec fails at
    ``data.<field>`` with "task '<name>' <reason>"."""

    field: str
    reason: str
    met: Callable[[DataSpec], bool]


A_SOURCE = Need(
    "dataset", "needs a dataset or data_files", lambda data: data.dataset is not None or data.data_files is not None
)
LOCAL_FILES = Need("data_files", "needs data_files", lambda data: data.data_files is not None)
# Needed by every task whose kind the spec gives (``Task.kind`` None); Task.unmet adds it.
A_KIND = Need("kind", "needs kind: classification or generation", lambda data: data.kind is not None)


@dataclass(frozen=True)
class Task:
    """One task.

    ``kind``: classification (the answer is a class's label string) or generation (free text); None: the spec's
    ``data.kind`` says. ``splits(data)``: its rows (:data:`Splits`). ``columns(data)``: role -> column of those
    rows; None: ``text`` and the kind's answer role (``label`` / ``target``), under the spec's ``data.columns``.
    ``headline(data)``: the metric that leads its metric names; None: the kind's first. ``train_rows(data)``: how
    many training examples the spec gives, where that is known without downloading (preflight checks that a batch
    fits); None, or None returned: not known. ``example(data)``: the text of one test input, for the model card and
    the registered model's input example; None: the prompt format stands in.
    """

    name: str
    summary: str  # one line, for model cards
    kind: Kind | None
    splits: Callable[[DataSpec], Splits]
    needs: tuple[Need, ...] = ()
    columns: Callable[[DataSpec], dict[str, str]] | None = None
    headline: Callable[[DataSpec], str] | None = None
    train_rows: Callable[[DataSpec], int | None] | None = None
    example: Callable[[DataSpec], str] | None = None

    def kind_of(self, data: DataSpec) -> Kind:
        # The spec has data.kind where the task has none (A_KIND).
        return self.kind or data.kind

    def column_roles(self, data: DataSpec) -> dict[str, str]:
        if self.columns is not None:
            return self.columns(data)
        answer = "label" if self.kind_of(data) == "classification" else "target"
        return {"text": "text", answer: answer, **data.columns}

    def metric_names(self, data: DataSpec) -> tuple[str, ...]:
        """The keys `evaluate` returns for this task, its headline metric first."""
        names = METRICS[self.kind_of(data)]
        head = names[0] if self.headline is None else self.headline(data)
        if head not in names:
            raise ValueError(f"task {self.name!r}: headline {head!r} is not one of its metrics {', '.join(names)}")
        return (head, *(name for name in names if name != head))

    def unmet(self, data: DataSpec) -> Need | None:
        """The first of the task's needs that ``data`` leaves unmet, or None."""
        needs = self.needs if self.kind is not None else (*self.needs, A_KIND)
        return next((need for need in needs if not need.met(data)), None)


# name -> task, in registration order (help texts and errors list them in it).
TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}")
    return TASKS[name]
