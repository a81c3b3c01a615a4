"""How every task gets its train / validation / test (docs/method.md §8), in one place: validation carved
out of train, a generated pool beside a fixed test set, the spec's local files or Hugging Face dataset as three
splits, and how many training rows a spec gives, counted without loading them.

The task modules import this one and the job spec imports them, so `datasets` is imported where it is used.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tasks.registry import DATA_FILE_FORMATS, DATA_SPLITS, Splits

if TYPE_CHECKING:
    import datasets

    from pipeline.spec.job import DataSpec


def table(columns: dict[str, Sequence[Any]]) -> datasets.Dataset:
    """Rows from ``{column: values}``: a generated task's data."""
    import datasets

    return datasets.Dataset.from_dict(columns)


def carve(
    train: datasets.Dataset, validation_fraction: float, split_seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """train and validation: ``validation_fraction`` of ``train`` (rounded up), drawn with ``split_seed``."""
    carved = train.train_test_split(test_size=validation_fraction, seed=split_seed)
    return carved["train"], carved["test"]


def carved_train_rows(rows: int, validation_fraction: float) -> int:
    """How many of ``rows`` stay in train after :func:`carve`."""
    return rows - math.ceil(rows * validation_fraction)


def pool_splits(rows: datasets.Dataset, pool: int, validation_fraction: float, split_seed: int) -> Splits:
    """Rows [0, pool) carved into train and validation, the rest the test set: fixed, so that test numbers stay
    comparable across split seeds and validation fractions."""
    train, validation = carve(rows.select(range(pool)), validation_fraction, split_seed)
    return {"train": train, "validation": validation, "test": rows.select(range(pool, len(rows)))}


def _given_whole(splits: Collection[str]) -> bool:
    """Whether a source's splits are used as they are; otherwise validation is carved out of train."""
    return {"validation", "test"} <= set(splits)


def three_splits(raw: dict[str, datasets.Dataset], data: DataSpec) -> Splits:
    """train / validation / test as given when all three exist; otherwise validation is carved out of train
    (:func:`carve`) and the source's validation split, or else its test split, becomes the test set (none when it
    has neither)."""
    if "train" not in raw:
        raise ValueError(f"the data has no train split (splits: {', '.join(raw) or 'none'})")
    if _given_whole(raw):
        return {split: raw[split] for split in DATA_SPLITS}
    train, validation = carve(raw["train"], data.validation_fraction, data.split_seed)
    return {"train": train, "validation": validation, "test": raw.get("validation", raw.get("test"))}


def load_raw(data: DataSpec) -> dict[str, datasets.Dataset]:
    """Local files (one `datasets` builder for all splits, named by the data_files keys) when given, else the
    Hugging Face dataset ``data.dataset`` / ``data.subset``."""
    import datasets

    if data.data_files:
        builder = DATA_FILE_FORMATS[Path(next(iter(data.data_files.values()))).suffix.lower()]
        return dict(datasets.load_dataset(builder, data_files=dict(data.data_files)))
    return dict(datasets.load_dataset(data.dataset, data.subset))


def source_splits(data: DataSpec) -> Splits:
    """The spec's local files or Hugging Face dataset as three splits."""
    return three_splits(load_raw(data), data)


def local_train_rows(data: DataSpec, dropped: Collection[str] = ()) -> int | None:
    """How many training examples the spec's local files give, where the task drops their ``dropped`` splits;
    None without local files (a Hugging Face dataset is not downloaded to count it)."""
    if not data.data_files:
        return None
    rows = _rows(Path(data.data_files["train"]))
    if _given_whole(set(data.data_files) - set(dropped)):
        return rows
    return carved_train_rows(rows, data.validation_fraction)


def _rows(path: Path) -> int:
    kind = DATA_FILE_FORMATS[path.suffix.lower()]
    if kind == "parquet":
        import pyarrow.parquet

        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    with path.open("rb") as file:
        lines = sum(1 for line in file if line.strip())
    return lines - 1 if kind == "csv" else lines  # a CSV's header
