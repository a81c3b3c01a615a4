"""A GLUE subset (nyu-mll/glue, or local files with its columns), scored as the official code does: the validation
split is the test set (GLUE's test labels are hidden) and CoLA's headline is Matthews correlation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.tasks.registry import A_SOURCE, DATA_SPLITS, Splits, Task, register_task
from pipeline.tasks.splits import load_raw, local_train_rows, three_splits

if TYPE_CHECKING:
    import datasets

    from pipeline.spec.job import DataSpec

# Role -> column per GLUE subset (nyu-mll/glue). STS-B is a regression task and has no entry.
GLUE_COLUMNS: dict[str, dict[str, str]] = {
    "cola": {"text": "sentence"},
    "sst2": {"text": "sentence"},
    "mrpc": {"text": "sentence1", "text_pair": "sentence2"},
    "qqp": {"text": "question1", "text_pair": "question2"},
    "mnli": {"text": "premise", "text_pair": "hypothesis"},
    "qnli": {"text": "question", "text_pair": "sentence"},
    "rte": {"text": "sentence1", "text_pair": "sentence2"},
    "wnli": {"text": "sentence1", "text_pair": "sentence2"},
}


def subset(data: DataSpec) -> str:
    return (data.subset or "").lower()


def columns(data: DataSpec) -> dict[str, str]:
    if subset(data) not in GLUE_COLUMNS and "text" not in data.columns:
        raise ValueError(
            f"no default columns for GLUE subset {data.subset!r} (known: {', '.join(GLUE_COLUMNS)}); "
            "set data.columns (text, optional text_pair, label)"
        )
    return {"label": "label", **GLUE_COLUMNS.get(subset(data), {}), **data.columns}


def glue_splits(raw: dict[str, datasets.Dataset], name: str) -> dict[str, datasets.Dataset]:
    """GLUE's test labels are hidden (-1), so its test split is dropped and its validation split becomes the test
    set; MNLI's matched and mismatched validation sets are concatenated, as the official code does."""
    import datasets

    raw = {split: rows for split, rows in raw.items() if split != "test"}
    if name == "mnli" and "validation" not in raw and "validation_matched" in raw:
        matched, mismatched = raw.pop("validation_matched"), raw.pop("validation_mismatched")
        raw["validation"] = datasets.concatenate_datasets([matched, mismatched])
    return {split: rows for split, rows in raw.items() if split in DATA_SPLITS}


def splits(data: DataSpec) -> Splits:
    return three_splits(glue_splits(load_raw(data), subset(data)), data)


register_task(
    Task(
        name="glue",
        summary="a GLUE subset: nyu-mll/glue, or local files with its columns",
        kind="classification",
        needs=(A_SOURCE,),
        splits=splits,
        columns=columns,
        headline=lambda data: "matthews" if subset(data) == "cola" else "accuracy",
        train_rows=lambda data: local_train_rows(data, dropped=("test",)),
    )
)
