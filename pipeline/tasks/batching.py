"""How an epoch's training examples become micro-batches (``training.batching``), in three layouts:

- ``padded``: a seeded shuffle cut into micro-batches of ``batch_size`` examples, each row padded to its batch's
  longest. Examples of very different lengths share a batch, and the steps compute the padding.
- ``grouped``: examples of similar length together: a seeded shuffle split into pools of about 50 micro-batches'
  examples, each pool sorted by length and cut into micro-batches of about equal token counts, the micro-batches in
  a seeded random order. Rows are still padded to their batch's longest, but that is about as long as the rest.
  Exact for every model.
- ``packed``: a seeded shuffle dealt into micro-batches of about equal token counts (each example to the one that
  holds the fewest tokens so far), each micro-batch one row of its examples end to end, with ``seq_idx`` numbering
  the examples of the row (0, 0, 0, 1, 1, 2, ...): no padding at all. Exact only for a model whose forward keeps
  the examples of a row apart (``sdt.fused.keeps_packed_examples_apart``).

One budget for all three, so that step counts, schedules and reports stay comparable: every layout makes the same
number of micro-batches per epoch as the padded one, ``len(examples) // (batch_size × world)`` per rank. The grouped
and packed layouts deal every example into them (the padded layout drops the remainder, as the official runs drop
the last partial batch), so each of their micro-batches holds about ``batch_size × (mean example length)`` tokens:
its share of the epoch's tokens, give or take one example. Micro-batch ``i`` of rank ``r`` is the epoch's batch
``i × world + r``.
"""

from __future__ import annotations

import heapq
import random
from typing import Literal

import torch

from pipeline.tasks.formatting import IGNORE_INDEX, pad_rows

Layout = Literal["padded", "grouped", "packed"]
LAYOUTS: tuple[Layout, ...] = ("padded", "grouped", "packed")
SEQ_IDX = "seq_idx"  # the model keyword that numbers a packed row's examples
# A grouped epoch sorts by length within pools of this many batches' examples, not all at once, so that a batch's
# examples change from epoch to epoch (sorting everything would batch the same neighbours in every epoch).
POOL_BATCHES = 50


def batches_per_rank(examples: int, batch_size: int, world: int) -> int:
    """Micro-batches per rank and epoch, whatever the layout."""
    return examples // (batch_size * world)


def epoch_batches(
    lengths: list[int], layout: Layout, batch_size: int, world: int, seed: int, epoch: int
) -> list[list[int]]:
    """The epoch's micro-batches, for all ranks, as lists of example indices (see the module docstring)."""
    count = batches_per_rank(len(lengths), batch_size, world) * world
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if layout == "padded":
        return [order[i * batch_size : (i + 1) * batch_size] for i in range(count)]
    if layout == "packed":
        return dealt_by_tokens(order, lengths, count)
    batches = [
        batch
        for pool, pool_count in pools(order, count)
        for batch in cut_by_tokens(sorted(pool, key=lambda index: lengths[index]), lengths, pool_count)
    ]  # sorted is stable: ties keep the shuffle's order
    rng.shuffle(batches)
    return batches


def pools(order: list[int], count: int) -> list[tuple[list[int], int]]:
    """``order`` in consecutive pools of about :data:`POOL_BATCHES` batches each, with the number of batches each
    pool makes (together ``count``): a pool's examples in proportion to its batches, so that every pool has at least
    one example per batch."""
    number = max(1, round(count / POOL_BATCHES))
    made = [count // number + (index < count % number) for index in range(number)]
    result, start, before = [], 0, 0
    for pool_count in made:
        before += pool_count
        end = len(order) * before // count
        result.append((order[start:end], pool_count))
        start = end
    return result


def dealt_by_tokens(order: list[int], lengths: list[int], count: int) -> list[list[int]]:
    """``order`` dealt into ``count`` batches, each example to the batch that holds the fewest tokens so far."""
    batches: list[list[int]] = [[] for _ in range(count)]
    fewest = [(0, number) for number in range(count)]  # (tokens, batch): a heap
    for index in order:
        tokens, number = heapq.heappop(fewest)
        batches[number].append(index)
        heapq.heappush(fewest, (tokens + lengths[index], number))
    return batches


def cut_by_tokens(order: list[int], lengths: list[int], count: int) -> list[list[int]]:
    """``order`` cut into ``count`` runs of consecutive examples, each about ``1 / count`` of the tokens and never
    empty: a run ends where its last example's middle would pass its share of the total."""
    total = sum(lengths[index] for index in order)
    batches, start, tokens = [], 0, 0
    for number in range(count):
        end, later_batches = start + 1, count - number - 1
        tokens += lengths[order[start]]
        target = total * (number + 1) / count
        while end < len(order) - later_batches and tokens + lengths[order[end]] / 2 <= target:
            tokens += lengths[order[end]]
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def packed_row(rows: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Examples (from :func:`pipeline.tasks.formatting.token_row`) end to end in one row: ``input_ids``, ``labels``
    (-100 except on answer tokens; always -100 on an example's first token, which the model would otherwise learn
    to predict from the example before it) and ``seq_idx`` (int32, which example each position belongs to)."""
    input_ids = torch.cat([tokens for tokens, _ in rows])[None]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    seq_idx = torch.empty_like(input_ids, dtype=torch.int32)
    start = 0
    for number, (tokens, answer_start) in enumerate(rows):
        end = start + len(tokens)
        labels[0, start + max(answer_start, 1) : end] = tokens[max(answer_start, 1) :]
        seq_idx[0, start:end] = number
        start = end
    return {"input_ids": input_ids, "labels": labels, SEQ_IDX: seq_idx}


def collate_layout(rows: list[tuple[torch.Tensor, int]], layout: Layout, pad_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch in ``layout``: a packed row, or rows padded to the longest."""
    return packed_row(rows) if layout == "packed" else pad_rows(rows, pad_id)


__all__ = ["LAYOUTS", "SEQ_IDX", "Layout", "batches_per_rank", "collate_layout", "epoch_batches", "packed_row"]
