"""Evaluation: the metrics of a model on a task's split.

Metrics are plain floats in [0, 1] except ``matthews`` (in [-1, 1]) and ``loss``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from pipeline.tasks.decoding import generate
from pipeline.tasks.formatting import IGNORE_INDEX, Example, collate, label_token_ids, pad_token_id
from pipeline.tasks.registry import DATA_SPLITS
from pipeline.tasks.sources import TaskData

if TYPE_CHECKING:
    from pipeline.spec.job import DataSpec


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

    Classification is scored at the position that predicts the first answer token (docs/method.md §8). ``strict``:
    argmax over the label strings' first tokens. ``official`` (the official code's): argmax over the whole
    vocabulary, and predictions that are no label token are dropped before scoring (all metrics 0 when every one
    is). Both report ``out_of_label``, the fraction of full-vocabulary argmaxes that are no label token. ``f1`` is
    binary (class 1 positive) for two classes, else macro.

    Generation decodes ``batch_size`` prompts at a time (greedy, or beam search for num_beams > 1); in fp32 each
    prompt gets the tokens it would get alone, in bf16 not always (:mod:`pipeline.tasks.decoding`). ROUGE is the mean
    F-measure (rouge-score, no stemming); ``bleu`` is sacrebleu's corpus BLEU / 100; ``exact_match`` compares
    whitespace-stripped strings.
    """
    if split not in DATA_SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(DATA_SPLITS)}")
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
    label_ids = label_token_ids(tokenizer, label_names)
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
    outputs = generate(
        model,
        [example.prompt_ids for example in examples],
        max_new_tokens=spec.max_new_tokens,
        num_beams=spec.num_beams,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        batch_size=batch_size,
    )
    predictions = [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in outputs]
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
