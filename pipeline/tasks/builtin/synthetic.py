"""A tiny generated classification task for tests: 5 tokens from "0".."15", the label 1 when at least 3 of them
are >= 8 (a majority vote). The digits tokenizer reads it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.tasks.registry import Splits, Task, register_task
from pipeline.tasks.splits import carved_train_rows, pool_splits, table

if TYPE_CHECKING:
    from pipeline.spec.job import DataSpec

SYNTHETIC_LENGTH, SYNTHETIC_POOL, SYNTHETIC_TEST = 5, 320, 80


def splits(data: DataSpec) -> Splits:
    tokens = np.random.default_rng(data.split_seed).integers(
        0, 16, size=(SYNTHETIC_POOL + SYNTHETIC_TEST, SYNTHETIC_LENGTH)
    )
    labels = ((tokens >= 8).sum(axis=1) * 2 > SYNTHETIC_LENGTH).astype(int)
    rows = table({"text": [" ".join(map(str, row)) + " " for row in tokens.tolist()], "label": labels.tolist()})
    return pool_splits(rows, SYNTHETIC_POOL, data.validation_fraction, data.split_seed)


register_task(
    Task(
        name="synthetic",
        summary="a tiny generated majority vote over 5 tokens, for tests",
        kind="classification",
        splits=splits,
        train_rows=lambda data: carved_train_rows(SYNTHETIC_POOL, data.validation_fraction),
    )
)
