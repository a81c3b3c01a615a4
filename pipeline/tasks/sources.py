"""A task's data as tokenized examples: :func:`load_task` asks the task's registry entry
(:mod:`pipeline.tasks.registry`) for its rows, columns, kind and metrics, caps the splits, checks that they have the
columns and tokenizes them (:mod:`pipeline.tasks.formatting`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets
from transformers import PreTrainedTokenizerBase

from pipeline.tasks.formatting import Example, classification_examples, generation_examples, label_token_ids
from pipeline.tasks.registry import Kind, get_task

if TYPE_CHECKING:
    from pipeline.spec.job import DataSpec


@dataclass
class TaskData:
    kind: Kind
    train: list[Example]
    validation: list[Example]
    test: list[Example]  # empty when the source has neither a test nor a validation split
    label_names: list[str] | None  # answer string per class index; None for generation
    metric_names: tuple[str, ...]  # the keys `evaluate` returns; the first is the task's headline metric

    def too_long(self) -> dict[str, int]:
        """Per split, how many examples were longer than ``data.max_length`` (and truncated to it)."""
        splits = {"train": self.train, "validation": self.validation, "test": self.test}
        return {name: sum(1 for example in examples if example.cut) for name, examples in splits.items()}


def _limit(split: datasets.Dataset | None, n: int | None, seed: int) -> datasets.Dataset | None:
    """At most ``n`` rows, a seeded random subset, so that a capped eval set is not the head of a sorted file."""
    if split is None or n is None or n >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(n))


def load_task(spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    """The task of ``spec`` as tokenized train / validation / test examples, split as its registry entry says, with
    ``max_train_samples`` / ``max_eval_samples`` applied after splitting. An example longer than ``max_length`` is
    truncated (:func:`pipeline.tasks.formatting.fit`; :meth:`TaskData.too_long` counts them) or, with ``too_long:
    refuse``, a ValueError naming the field."""
    task = get_task(spec.task)
    kind = task.kind_of(spec)
    columns = task.column_roles(spec)
    rows = task.splits(spec)
    caps = {"train": spec.max_train_samples, "validation": spec.max_eval_samples, "test": spec.max_eval_samples}
    splits = {split: _limit(rows.get(split), cap, spec.split_seed) for split, cap in caps.items()}
    roles = ("text", "text_pair", "label" if kind == "classification" else "target")
    for split_name, split in splits.items():
        if split is None:
            continue
        missing = [columns[role] for role in roles if role in columns and columns[role] not in split.column_names]
        if missing:
            raise ValueError(f"the {split_name} split has no column {missing} (columns: {split.column_names})")

    if kind == "classification":
        label_names = _label_names(splits, columns["label"], spec.label_names)
        label_token_ids(tokenizer, label_names)  # fail at load time, not at the first eval
        examples = {
            name: classification_examples(split, columns, label_names, spec, tokenizer)
            for name, split in splits.items()
        }
    else:
        label_names = None
        examples = {name: generation_examples(split, columns, spec, tokenizer) for name, split in splits.items()}
    if spec.too_long == "refuse":
        refuse_too_long(examples, spec.max_length)
    return TaskData(
        kind, examples["train"], examples["validation"], examples["test"], label_names, task.metric_names(spec)
    )


def refuse_too_long(examples: dict[str, list[Example]], max_length: int) -> None:
    """``data.too_long: refuse``: one line naming the field, how many examples of which splits are too long, and
    the longest."""
    long = {
        name: [len(e.prompt_ids) + len(e.answer_ids) + e.cut for e in split if e.cut]
        for name, split in examples.items()
    }
    if any(long.values()):
        counts = ", ".join(
            f"{len(lengths)} of {len(examples[name])} {name}" for name, lengths in long.items() if lengths
        )
        longest = max(max(lengths) for lengths in long.values() if lengths)
        raise ValueError(
            f"data.too_long: refuse, and {counts} examples are longer than data.max_length {max_length} (the longest "
            f"{longest} tokens); raise max_length, or set too_long: truncate to cut their prompts from the left"
        )


def _label_names(splits: dict[str, datasets.Dataset | None], column: str, given: list[str] | None) -> list[str]:
    """Answer strings per class: ``label_names`` when given; "0", "1", ... for integer labels (the official
    digit answers); the sorted distinct values for string labels (e.g. a CSV with "no"/"yes")."""
    if given is not None:
        return list(given)
    train = splits["train"]
    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return [str(index) for index in range(feature.num_classes)]
    if feature.dtype in ("string", "large_string"):
        return sorted(set(train[column]))
    largest = max(max(split[column]) for split in splits.values() if split is not None and len(split))
    return [str(index) for index in range(largest + 1)]
