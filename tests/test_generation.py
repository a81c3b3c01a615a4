"""Batched generation equals one-prompt-at-a-time generation, token for token: greedy, and beam search against
transformers' own beam search on each prompt alone; tiny Mamba, Mamba-2 and Jamba, prompts of different lengths."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB

from pipeline.tasks.decoding import batches, generate

EOS = PAD = VOCAB - 1
LENGTHS = [3, 11, 6, 1, 9, 6, 14]


def prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 1, (n,), generator=generator).tolist() for n in LENGTHS]


def alone(model, prompt: list[int], num_beams: int, max_new_tokens: int) -> list[int]:
    """transformers' generate on one prompt, cut after its first eos, as the batched path returns it."""
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, num_beams=num_beams,
        do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
    )[0, len(prompt):].tolist()  # fmt: skip
    return out[: out.index(EOS) + 1] if EOS in out else out


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("arch", ["mamba", "mamba2", "jamba"])
def test_batched_generation_is_exact(load_base, arch, num_beams):
    model = load_base(arch).eval()
    # Sharpen the logits, so that tokens differ between prompts and ties are out of reach of float noise.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    expected = [alone(model, p, num_beams, max_new_tokens=12) for p in prompts()]
    got = generate(model, prompts(), max_new_tokens=12, num_beams=num_beams, eos_token_id=EOS, pad_token_id=PAD,
                   batch_size=4)  # fmt: skip
    assert got == expected
    assert len({tuple(tokens) for tokens in got}) > 1  # not all the same continuation


def test_batches_go_longest_first_and_keep_lengths_apart_when_padding_is_not_exact():
    lengths = [[0] * n for n in (3, 5, 5, 2, 5)]
    assert batches(lengths, 2, mixed_lengths=True) == [[1, 2], [4, 0], [3]]
    assert batches(lengths, 2, mixed_lengths=False) == [[1, 2], [4], [0], [3]]
