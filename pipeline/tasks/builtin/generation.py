"""Text in, text out (summaries, SQL, ...): a Hugging Face dataset or local files, scored with ROUGE, BLEU and exact
match. SAMSum's dialogue / summary columns are recognised by name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.tasks.registry import A_SOURCE, Task, register_task
from pipeline.tasks.splits import local_train_rows, source_splits

if TYPE_CHECKING:
    from pipeline.spec.job import DataSpec


def _mentions(data: DataSpec, word: str) -> bool:
    names = [data.dataset or "", data.subset or "", *(data.data_files or {}).values()]
    return any(word in name.lower() for name in names)


def columns(data: DataSpec) -> dict[str, str]:
    text, target = ("dialogue", "summary") if _mentions(data, "samsum") else ("text", "target")
    return {"text": text, "target": target, **data.columns}


register_task(
    Task(
        name="generation",
        summary="text in, text out: a Hugging Face dataset or local files",
        kind="generation",
        needs=(A_SOURCE,),
        splits=source_splits,
        columns=columns,
        train_rows=local_train_rows,
    )
)
