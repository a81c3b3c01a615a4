"""Tasks: where train / validation / test come from and how each is split (sdt-spec.md section 6).

``digits`` (scikit-learn's bundled 8x8 digits as pixel-token sequences, :mod:`pipeline.tasks.digits`; no download),
``synthetic`` (a tiny generated task for tests), ``glue`` and ``generation`` (Hugging Face datasets or local
files), and ``files`` (local files with a column mapping).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from pipeline.tasks.digits import digits_splits
from pipeline.tasks.formatting import Example, classification_examples, generation_examples, label_token_ids
from pipeline.tasks.registry import DATA_FILE_FORMATS, DATA_SPLITS

if TYPE_CHECKING:
    from pipeline.spec.job import DataSpec

Kind = Literal["classification", "generation"]
# The keys `pipeline.tasks.metrics.evaluate` returns per kind; the first is the task's headline metric.
CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "f1", "matthews", "out_of_label", "loss")
GENERATION_METRICS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "bleu", "exact_match", "loss")

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

# Synthetic: 5 tokens from "0".."15"; the label is 1 when at least 3 of them are >= 8 (a majority vote).
SYNTHETIC_LENGTH, SYNTHETIC_POOL, SYNTHETIC_TEST = 5, 320, 80


@dataclass
class TaskData:
    kind: Kind
    train: list[Example]
    validation: list[Example]
    test: list[Example]  # empty when the source has neither a test nor a validation split
    label_names: list[str] | None  # answer string per class index; None for generation
    metric_names: tuple[str, ...]  # the keys `evaluate` returns; the first is the task's headline metric


def _synthetic_splits(validation_fraction: float, split_seed: int) -> dict[str, datasets.Dataset]:
    tokens = np.random.default_rng(split_seed).integers(0, 16, size=(SYNTHETIC_POOL + SYNTHETIC_TEST, SYNTHETIC_LENGTH))
    labels = ((tokens >= 8).sum(axis=1) * 2 > SYNTHETIC_LENGTH).astype(int)
    table = datasets.Dataset.from_dict(
        {"text": [" ".join(map(str, row)) + " " for row in tokens.tolist()], "label": labels.tolist()}
    )
    pool = table.select(range(SYNTHETIC_POOL)).train_test_split(test_size=validation_fraction, seed=split_seed)
    return {"train": pool["train"], "validation": pool["test"], "test": table.select(range(SYNTHETIC_POOL, len(table)))}


def _load_raw(spec: DataSpec) -> dict[str, datasets.Dataset]:
    """Local files (one `datasets` builder for all splits, named by the data_files keys) when given, else the
    Hugging Face dataset ``spec.dataset`` / ``spec.subset``."""
    if spec.data_files:
        builder = DATA_FILE_FORMATS[Path(next(iter(spec.data_files.values()))).suffix.lower()]
        return dict(datasets.load_dataset(builder, data_files=dict(spec.data_files)))
    return dict(datasets.load_dataset(spec.dataset, spec.subset))


def _three_splits(raw: dict[str, datasets.Dataset], spec: DataSpec) -> dict[str, datasets.Dataset | None]:
    """train / validation / test as given when all three exist; otherwise validation is carved out of train
    (`train_test_split(validation_fraction, seed=split_seed)`, spec section 6) and the source's validation split,
    or else its test split, becomes the test set (none when it has neither)."""
    if "train" not in raw:
        raise ValueError(f"the data has no train split (splits: {', '.join(raw) or 'none'})")
    if "validation" in raw and "test" in raw:
        return {split: raw[split] for split in DATA_SPLITS}
    carved = raw["train"].train_test_split(test_size=spec.validation_fraction, seed=spec.split_seed)
    return {"train": carved["train"], "validation": carved["test"], "test": raw.get("validation", raw.get("test"))}


def _glue_splits(raw: dict[str, datasets.Dataset], subset: str) -> dict[str, datasets.Dataset]:
    """GLUE's test labels are hidden (-1), so its test split is dropped and its validation split becomes the test
    set; MNLI's matched and mismatched validation sets are concatenated, as the official code does."""
    raw = {name: split for name, split in raw.items() if name != "test"}
    if subset == "mnli" and "validation" not in raw and "validation_matched" in raw:
        matched, mismatched = raw.pop("validation_matched"), raw.pop("validation_mismatched")
        raw["validation"] = datasets.concatenate_datasets([matched, mismatched])
    return {name: split for name, split in raw.items() if name in DATA_SPLITS}


def _limit(split: datasets.Dataset | None, n: int | None, seed: int) -> datasets.Dataset | None:
    """At most ``n`` rows, a seeded random subset, so that a capped eval set is not the head of a sorted file."""
    if split is None or n is None or n >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(n))


def _mentions(spec: DataSpec, word: str) -> bool:
    names = [spec.dataset or "", spec.subset or "", *(spec.data_files or {}).values()]
    return any(word in name.lower() for name in names)


def load_task(spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    """The task of ``spec`` as tokenized train / validation / test examples, split as documented above, with
    ``max_train_samples`` / ``max_eval_samples`` applied after splitting."""
    label_roles = {"text": "text", "label": "label"}
    head = "accuracy"
    if spec.task == "digits":
        kind: Kind = "classification"
        splits, columns = digits_splits(spec.validation_fraction, spec.split_seed), label_roles
    elif spec.task == "synthetic":
        kind = "classification"
        splits, columns = _synthetic_splits(spec.validation_fraction, spec.split_seed), label_roles
    elif spec.task == "glue":
        kind = "classification"
        subset = (spec.subset or "").lower()
        if subset not in GLUE_COLUMNS and "text" not in spec.columns:
            raise ValueError(
                f"no default columns for GLUE subset {spec.subset!r} (known: {', '.join(GLUE_COLUMNS)}); "
                "set data.columns (text, optional text_pair, label)"
            )
        columns = {"label": "label", **GLUE_COLUMNS.get(subset, {}), **spec.columns}
        splits = _three_splits(_glue_splits(_load_raw(spec), subset), spec)
        head = "matthews" if subset == "cola" else "accuracy"
    elif spec.task == "generation":
        kind = "generation"
        text, target = ("dialogue", "summary") if _mentions(spec, "samsum") else ("text", "target")
        columns = {"text": text, "target": target, **spec.columns}
        splits = _three_splits(_load_raw(spec), spec)
    elif spec.task == "files":
        if spec.kind is None:
            raise ValueError("task 'files' needs data.kind (classification or generation)")
        kind = spec.kind
        answer_role = "label" if kind == "classification" else "target"
        columns = {"text": "text", answer_role: answer_role, **spec.columns}
        splits = _three_splits(_load_raw(spec), spec)
    else:
        raise ValueError(f"unknown task {spec.task!r}")

    splits = {
        "train": _limit(splits["train"], spec.max_train_samples, spec.split_seed),
        "validation": _limit(splits["validation"], spec.max_eval_samples, spec.split_seed),
        "test": _limit(splits["test"], spec.max_eval_samples, spec.split_seed),
    }
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
        metric_names = (head, *(m for m in CLASSIFICATION_METRICS if m != head))
    else:
        label_names = None
        examples = {name: generation_examples(split, columns, spec, tokenizer) for name, split in splits.items()}
        metric_names = GENERATION_METRICS
    return TaskData(kind, examples["train"], examples["validation"], examples["test"], label_names, metric_names)


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
