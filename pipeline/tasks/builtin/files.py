"""Local files with a column mapping, classification or generation as the spec's ``data.kind`` says."""

from __future__ import annotations

from pipeline.tasks.registry import LOCAL_FILES, Task, register_task
from pipeline.tasks.splits import local_train_rows, source_splits

register_task(
    Task(
        name="files",
        summary="local files with a column mapping; data.kind says classification or generation",
        kind=None,
        needs=(LOCAL_FILES,),
        splits=source_splits,
        train_rows=local_train_rows,
    )
)
