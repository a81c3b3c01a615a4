"""Tasks, prompt formatting, collation and metrics, as the official SDT code does them (sdt-spec.md section 6).

Every sample is a prompt and an answer. The prompt is ``instruction + text + "###"`` (a pair:
``instruction + text + "###" + text_pair + "###"``), tokenized with the tokenizer's own special tokens (a BOS for
tokenizers that add one; GPT-NeoX adds none). The answer is the class's label string (no eos) for classification
and ``target`` + eos for generation, tokenized without special tokens. Training feeds ``prompt + answer`` with
labels -100 everywhere except the answer tokens, aligned with ``input_ids``: Hugging Face causal LMs shift labels
themselves.

Tasks: ``digits`` (scikit-learn's bundled 8x8 digits as pixel-token sequences; no download), ``synthetic`` (a tiny
generated task for tests), ``glue`` and ``generation`` (Hugging Face datasets or local files), and ``files`` (local
files with a column mapping). Metrics are plain floats in [0, 1] except ``matthews`` (in [-1, 1]) and ``loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pipeline.config import DATA_FILE_FORMATS

if TYPE_CHECKING:
    from pipeline.config import DataSpec

SEP = "###"
EOS = "<|endoftext|>"
IGNORE_INDEX = -100

Kind = Literal["classification", "generation"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")
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

# Digits: images [0, 1500) are shuffled (split_seed) into train/validation, [1500, 1797) are the test set (297).
# A fixed test set keeps test numbers comparable across split seeds and validation fractions.
DIGITS_POOL = 1500
DIGITS_MAX_PIXEL = 16  # load_digits pixel values are 0..16

# Synthetic: 5 tokens from "0".."15"; the label is 1 when at least 3 of them are >= 8 (a majority vote).
SYNTHETIC_LENGTH, SYNTHETIC_POOL, SYNTHETIC_TEST = 5, 320, 80


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    answer_ids: list[int]
    reference: str | int  # class index (classification) or reference text (generation)


@dataclass
class TaskData:
    kind: Kind
    train: list[Example]
    validation: list[Example]
    test: list[Example]  # empty when the source has neither a test nor a validation split
    label_names: list[str] | None  # answer string per class index; None for generation
    metric_names: tuple[str, ...]  # the keys `evaluate` returns; the first is the task's headline metric


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers and the built-in tasks


def digits_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over whitespace-separated pixel values for the ``digits`` and ``synthetic`` tasks.

    Ids: pixel value v is id v (0..16), then "###" (17), "<|endoftext|>" (18, eos and pad) and "<unk>" (19).
    "###" is the sep token, so it is one token even when written against a number ("16###").
    """
    vocab = {str(value): value for value in range(DIGITS_MAX_PIXEL + 1)}
    for token in (SEP, EOS, "<unk>"):
        vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=EOS, unk_token="<unk>", sep_token=SEP
    )


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id; eos when the tokenizer has no pad token (GPT-NeoX, as in the official code)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


def _digits_splits(validation_fraction: float, split_seed: int) -> dict[str, datasets.Dataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.data.astype(int).tolist()
    # The trailing space makes the prompt "... 0 ###", so "###" stays its own token for any tokenizer.
    table = datasets.Dataset.from_dict(
        {"pixels": pixels, "text": [" ".join(map(str, row)) + " " for row in pixels], "label": digits.target.tolist()}
    )
    pool = table.select(range(DIGITS_POOL)).train_test_split(test_size=validation_fraction, seed=split_seed)
    return {"train": pool["train"], "validation": pool["test"], "test": table.select(range(DIGITS_POOL, len(table)))}


def digits_pixel_sequences(split: str, split_seed: int = 123, validation_fraction: float = 0.2) -> list[list[int]]:
    """The 64 pixel token ids of each digits image of ``split`` (in the order `load_task` uses), without the
    instruction, separator or label: data for next-pixel pretraining. Ids are those of `digits_tokenizer`, where
    pixel value v has id v. Pass the job's split_seed / validation_fraction to get the job's train split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    return list(_digits_splits(validation_fraction, split_seed)[split]["pixels"])


def _synthetic_splits(validation_fraction: float, split_seed: int) -> dict[str, datasets.Dataset]:
    tokens = np.random.default_rng(split_seed).integers(0, 16, size=(SYNTHETIC_POOL + SYNTHETIC_TEST, SYNTHETIC_LENGTH))
    labels = ((tokens >= 8).sum(axis=1) * 2 > SYNTHETIC_LENGTH).astype(int)
    table = datasets.Dataset.from_dict(
        {"text": [" ".join(map(str, row)) + " " for row in tokens.tolist()], "label": labels.tolist()}
    )
    pool = table.select(range(SYNTHETIC_POOL)).train_test_split(test_size=validation_fraction, seed=split_seed)
    return {"train": pool["train"], "validation": pool["test"], "test": table.select(range(SYNTHETIC_POOL, len(table)))}


# ---------------------------------------------------------------------------------------------------------------
# Loading and splitting


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
        return {split: raw[split] for split in SPLITS}
    carved = raw["train"].train_test_split(test_size=spec.validation_fraction, seed=spec.split_seed)
    return {"train": carved["train"], "validation": carved["test"], "test": raw.get("validation", raw.get("test"))}


def _glue_splits(raw: dict[str, datasets.Dataset], subset: str) -> dict[str, datasets.Dataset]:
    """GLUE's test labels are hidden (-1), so its test split is dropped and its validation split becomes the test
    set; MNLI's matched and mismatched validation sets are concatenated, as the official code does."""
    raw = {name: split for name, split in raw.items() if name != "test"}
    if subset == "mnli" and "validation" not in raw and "validation_matched" in raw:
        matched, mismatched = raw.pop("validation_matched"), raw.pop("validation_mismatched")
        raw["validation"] = datasets.concatenate_datasets([matched, mismatched])
    return {name: split for name, split in raw.items() if name in SPLITS}


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
        splits, columns = _digits_splits(spec.validation_fraction, spec.split_seed), label_roles
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
        _label_token_ids(tokenizer, label_names)  # fail at load time, not at the first eval
        examples = {
            name: _classification_examples(split, columns, label_names, spec, tokenizer)
            for name, split in splits.items()
        }
        metric_names = (head, *(m for m in ("accuracy", "f1", "matthews") if m != head), "out_of_label", "loss")
    else:
        label_names = None
        examples = {name: _generation_examples(split, columns, spec, tokenizer) for name, split in splits.items()}
        metric_names = GENERATION_METRICS
    return TaskData(kind, examples["train"], examples["validation"], examples["test"], label_names, metric_names)


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def _prompts(split: datasets.Dataset, columns: dict[str, str], instruction: str) -> list[str]:
    texts = split[columns["text"]]
    if "text_pair" not in columns:
        return [f"{instruction}{text}{SEP}" for text in texts]
    return [f"{instruction}{text}{SEP}{pair}{SEP}" for text, pair in zip(texts, split[columns["text_pair"]])]


def _fit(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut prompt + answer to ``max_length`` by dropping prompt tokens from the left, so the "###" before the
    answer stays. An answer that leaves no room for one prompt token is itself cut from the right."""
    answer = answer[: max_length - 1]
    return prompt[-(max_length - len(answer)) :], answer


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


def _label_token_ids(tokenizer: PreTrainedTokenizerBase, label_names: list[str]) -> list[int]:
    """The first token id of each label string: classification is scored at that one position."""
    firsts = []
    for name in label_names:
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"label string {name!r} tokenizes to nothing")
        firsts.append(ids[0])
    if len(set(firsts)) != len(firsts):
        tokens = tokenizer.convert_ids_to_tokens(firsts)
        shown = ", ".join(f"{name!r} -> {token!r}" for name, token in zip(label_names, tokens))
        raise ValueError(f"label strings must start with distinct tokens to be scored at one position: {shown}")
    return firsts


def _classification_examples(
    split: datasets.Dataset | None,
    columns: dict[str, str],
    label_names: list[str],
    spec: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
) -> list[Example]:
    if split is None:
        return []
    answers = [tokenizer(name, add_special_tokens=False)["input_ids"] for name in label_names]
    index_of = {name: index for index, name in enumerate(label_names)}
    examples = []
    prompt_ids = tokenizer(_prompts(split, columns, spec.instruction))["input_ids"]
    for row, (prompt, label) in enumerate(zip(prompt_ids, split[columns["label"]])):
        index = index_of.get(label) if isinstance(label, str) else label
        if index is None or not 0 <= index < len(label_names):
            raise ValueError(f"row {row}: label {label!r} is not one of the {len(label_names)} classes {label_names}")
        examples.append(Example(*_fit(prompt, answers[index], spec.max_length), reference=int(index)))
    return examples


def _generation_examples(
    split: datasets.Dataset | None, columns: dict[str, str], spec: DataSpec, tokenizer: PreTrainedTokenizerBase
) -> list[Example]:
    if split is None:
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError("generation needs a tokenizer with an eos token (it ends every answer)")
    targets = list(split[columns["target"]])  # a datasets Column; the tokenizer wants a list
    if any(target is None for target in targets):
        raise ValueError(f"column {columns['target']!r} has empty targets")
    prompt_ids = tokenizer(_prompts(split, columns, spec.instruction))["input_ids"]
    answer_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    return [
        Example(*_fit(prompt, answer + [tokenizer.eos_token_id], spec.max_length), reference=target)
        for prompt, answer, target in zip(prompt_ids, answer_ids, targets)
    ]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` (pad_id), ``labels`` (-100 except on answer tokens, aligned with input_ids)
    and ``attention_mask``."""
    width = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        start, end = len(example.prompt_ids), len(example.prompt_ids) + len(example.answer_ids)
        input_ids[row, :end] = torch.tensor(example.prompt_ids + example.answer_ids)
        labels[row, start:end] = torch.tensor(example.answer_ids)
        attention_mask[row, :end] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    model: torch.nn.Module,
    task: TaskData,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    spec: DataSpec,
    batch_size: int = 8,
) -> dict[str, float]:
    """Metrics of ``model`` on ``split`` (keys: ``task.metric_names``), and ``loss``, the mean cross-entropy
    over the answer tokens.

    Classification is scored at the position that predicts the first answer token. ``strict``: argmax over the
    label strings' first tokens. ``official`` (spec pitfall 13): argmax over the whole vocabulary, and predictions
    that are no label token are dropped before scoring (all metrics 0 when every one is). Both report
    ``out_of_label``, the fraction of full-vocabulary argmaxes that are no label token. ``f1`` is binary (class
    1 positive) for two classes, else macro.

    Generation decodes one prompt at a time with ``model.generate`` (greedy, or beam search for num_beams > 1):
    batching prompts of different lengths would need left padding, and a recurrent scan does not skip pad
    positions the way masked attention does. ROUGE is the mean F-measure (rouge-score, no stemming); ``bleu`` is sacrebleu's
    corpus BLEU / 100; ``exact_match`` compares whitespace-stripped strings.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    examples = getattr(task, split)
    if not examples:
        raise ValueError(f"the {split} split is empty")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if task.kind == "classification":
                return _evaluate_classification(model, examples, task.label_names, tokenizer, spec, batch_size)
            return _evaluate_generation(model, examples, tokenizer, spec, batch_size)
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: torch.nn.Module, examples: list[Example], pad_id: int, batch_size: int):
    """Yields (examples, logits, answer-token loss sum, answer-token count) per batch. Logits stay in the model's
    dtype; only the rows that are scored are cast to fp32 (a full fp32 copy is batch x length x vocab)."""
    device = _device(model)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        # Logits at t predict token t + 1.
        targets = batch["labels"][:, 1:].to(device)
        scored = targets != IGNORE_INDEX
        loss_sum = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum")
        yield chunk, logits, loss_sum.item(), int(scored.sum())


def _evaluate_classification(
    model: torch.nn.Module,
    examples: list[Example],
    label_names: list[str],
    tokenizer: PreTrainedTokenizerBase,
    spec: DataSpec,
    batch_size: int,
) -> dict[str, float]:
    label_ids = _label_token_ids(tokenizer, label_names)
    class_of = {token: index for index, token in enumerate(label_ids)}
    full, strict = [], []
    loss_sum, count = 0.0, 0
    for chunk, logits, chunk_loss, chunk_count in _forward(model, examples, pad_token_id(tokenizer), batch_size):
        positions = torch.tensor([len(e.prompt_ids) - 1 for e in chunk], device=logits.device)
        scores = logits[torch.arange(len(chunk), device=logits.device), positions].float()
        full += scores.argmax(dim=-1).tolist()
        strict += scores[:, label_ids].argmax(dim=-1).tolist()
        loss_sum, count = loss_sum + chunk_loss, count + chunk_count
    references = [e.reference for e in examples]
    if spec.scoring == "strict":
        y_true, y_pred = references, strict
    else:
        kept = [(reference, class_of[token]) for reference, token in zip(references, full) if token in class_of]
        y_true, y_pred = [r for r, _ in kept], [p for _, p in kept]
    metrics = _classification_scores(y_true, y_pred, len(label_names))
    metrics["out_of_label"] = sum(token not in class_of for token in full) / len(full)
    metrics["loss"] = loss_sum / count
    return metrics


def _classification_scores(y_true: list[int], y_pred: list[int], n_classes: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if not y_true:
        return {"accuracy": 0.0, "f1": 0.0, "matthews": 0.0}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, average="binary" if n_classes == 2 else "macro", zero_division=0)),
        "matthews": float(matthews_corrcoef(y_true, y_pred)),
    }


def _evaluate_generation(
    model: torch.nn.Module,
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    spec: DataSpec,
    batch_size: int,
) -> dict[str, float]:
    pad_id = pad_token_id(tokenizer)
    loss_sum, count = 0.0, 0
    for _, _, chunk_loss, chunk_count in _forward(model, examples, pad_id, batch_size):
        loss_sum, count = loss_sum + chunk_loss, count + chunk_count
    device = _device(model)
    predictions = []
    for example in examples:
        prompt = torch.tensor([example.prompt_ids], device=device)
        output = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=spec.max_new_tokens,
            num_beams=spec.num_beams,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
        )
        predictions.append(tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True).strip())
    metrics = _generation_scores(predictions, [str(e.reference) for e in examples])
    metrics["loss"] = loss_sum / count
    return metrics


def _generation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(reference, prediction) for reference, prediction in zip(references, predictions)]
    metrics = {key: float(np.mean([score[key].fmeasure for score in scores])) for key in ("rouge1", "rouge2", "rougeL")}
    metrics["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score / 100
    metrics["exact_match"] = float(np.mean([p == r.strip() for p, r in zip(predictions, references)]))
    return metrics
