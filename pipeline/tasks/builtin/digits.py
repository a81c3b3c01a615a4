"""The built-in digits task: scikit-learn's bundled 8x8 digits as 61 pixel tokens, the digit's class as the answer;
no download. Its rows come from :mod:`pipeline.tasks.digits`, imported on use: that module also holds the tiny
base model (torch, transformers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.tasks.registry import Splits, Task, register_task
from pipeline.tasks.splits import carved_train_rows

if TYPE_CHECKING:
    from pipeline.spec.job import DataSpec


def splits(data: DataSpec) -> Splits:
    from pipeline.tasks.digits import digits_splits

    return digits_splits(data.validation_fraction, data.split_seed)


def train_rows(data: DataSpec) -> int:
    from pipeline.tasks.digits import DIGITS_POOL

    return carved_train_rows(DIGITS_POOL, data.validation_fraction)


def first_test_image(data: DataSpec) -> str:
    return splits(data)["test"][0]["text"]


register_task(
    Task(
        name="digits",
        summary="scikit-learn's 8x8 digits as pixel tokens, the digit as the answer (built in, no download)",
        kind="classification",
        splits=splits,
        train_rows=train_rows,
        example=first_test_image,
    )
)
