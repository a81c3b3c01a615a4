"""How a sample becomes tokens, as the official SDT code does it (docs/method.md §8).

Every sample is a prompt and an answer. The prompt is ``instruction + text + "###"`` (a pair:
``instruction + text + "###" + text_pair + "###"``), tokenized with the tokenizer's own special tokens (a BOS for
tokenizers that add one; GPT-NeoX adds none). The answer is the class's label string (no eos) for classification
and ``target`` + eos for generation, tokenized without special tokens. Training feeds ``prompt + answer`` with
labels -100 everywhere except the answer tokens, aligned with ``input_ids``: Hugging Face causal LMs shift labels
themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets
import torch
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from pipeline.spec.job import DataSpec

SEP = "###"
EOS = "<|endoftext|>"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    answer_ids: list[int]
    reference: str | int  # class index (classification) or reference text (generation)
    cut: int = 0  # tokens :func:`fit` cut off to keep the example within ``data.max_length``


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id; eos when the tokenizer has no pad token (GPT-NeoX, as in the official code)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


def prompts(split: datasets.Dataset, columns: dict[str, str], instruction: str) -> list[str]:
    texts = split[columns["text"]]
    if "text_pair" not in columns:
        return [f"{instruction}{text}{SEP}" for text in texts]
    return [f"{instruction}{text}{SEP}{pair}{SEP}" for text, pair in zip(texts, split[columns["text_pair"]])]


def fit(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut prompt + answer to ``max_length`` by dropping prompt tokens from the left, so the "###" before the
    answer stays. An answer that leaves no room for one prompt token is itself cut from the right."""
    answer = answer[: max_length - 1]
    return prompt[-(max_length - len(answer)) :], answer


def fitted(prompt: list[int], answer: list[int], reference: str | int, max_length: int) -> Example:
    """The example of ``prompt`` and ``answer``, :func:`fit` to ``max_length``, saying how many tokens that cut."""
    kept_prompt, kept_answer = fit(prompt, answer, max_length)
    cut = len(prompt) + len(answer) - len(kept_prompt) - len(kept_answer)
    return Example(kept_prompt, kept_answer, reference, cut=cut)


def label_token_ids(tokenizer: PreTrainedTokenizerBase, label_names: list[str]) -> list[int]:
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


def classification_examples(
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
    prompt_ids = tokenizer(prompts(split, columns, spec.instruction))["input_ids"]
    for row, (prompt, label) in enumerate(zip(prompt_ids, split[columns["label"]])):
        index = index_of.get(label) if isinstance(label, str) else label
        if index is None or not 0 <= index < len(label_names):
            raise ValueError(f"row {row}: label {label!r} is not one of the {len(label_names)} classes {label_names}")
        examples.append(fitted(prompt, answers[index], int(index), spec.max_length))
    return examples


def generation_examples(
    split: datasets.Dataset | None, columns: dict[str, str], spec: DataSpec, tokenizer: PreTrainedTokenizerBase
) -> list[Example]:
    if split is None:
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError("generation needs a tokenizer with an eos token (it ends every answer)")
    targets = list(split[columns["target"]])  # a datasets Column; the tokenizer wants a list
    if any(target is None for target in targets):
        raise ValueError(f"column {columns['target']!r} has empty targets")
    prompt_ids = tokenizer(prompts(split, columns, spec.instruction))["input_ids"]
    answer_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    return [
        fitted(prompt, [*answer, tokenizer.eos_token_id], target, spec.max_length)
        for prompt, answer, target in zip(prompt_ids, answer_ids, targets)
    ]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` (pad_id), ``labels`` (-100 except on answer tokens, aligned with input_ids)
    and ``attention_mask``."""
    return pad_rows([token_row(example) for example in examples], pad_id)


def token_row(example: Example) -> tuple[torch.Tensor, int]:
    """The example's tokens as one tensor, and where its answer starts."""
    return torch.tensor(example.prompt_ids + example.answer_ids), len(example.prompt_ids)


def pad_rows(rows: list[tuple[torch.Tensor, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`collate` of examples already converted by :func:`token_row`: converting Python ints is most of what
    collating costs, so training converts each example once."""
    width = max(len(tokens) for tokens, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (tokens, answer_start) in enumerate(rows):
        input_ids[row, : len(tokens)] = tokens
        labels[row, answer_start : len(tokens)] = tokens[answer_start:]
        attention_mask[row, : len(tokens)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
