"""Batched generation for SSMs: many prompts decode together, and in fp32 each gets the tokens it would get alone.

One prompt at a time leaves the GPU idle: a decode step of a 1.4b Mamba costs about the same for 1 sequence as
for hundreds (it is bound by the host and by reading the weights), so an evaluation of SAMSum's 819 dialogues
one by one takes longer than training on them. Here prompts go through ``model.generate`` in batches.

A recurrent model has no attention to hide padding from, so batching is made exact by **left padding with the
attention mask**: transformers' Mamba, Mamba-2 and Jamba mixers zero the masked positions before ``in_proj`` and
again after the convolution, so a pad position feeds nothing into the scan (its state update ``exp(ΔA)·h + Δ·B·x``
keeps ``h = 0``) and reaches the convolution as the zeros of its own causal padding; Jamba's attention layers skip
masked keys. This holds when ``in_proj`` has no bias (every released Mamba, Mamba-2 and Jamba checkpoint); a model
with one would turn a zeroed input into its bias, so its prompts are batched only with prompts of the same length.
Beam search normalises scores by the number of generated tokens, not the padded length, so beams are unchanged
too.

What "exact" means: **in fp32, batched greedy decoding and beam search give every prompt the same tokens as
transformers' ``generate`` on that prompt alone, token for token.** It is not bit-identity of the logits: a padded
batch sums in another order than a single prompt, so the two differ by float rounding (below 1e-6 on the tiny test
models), which cannot change a choice unless two candidates tie within that rounding. ``tests/test_generation.py``
checks it on the CPU and, marked ``cuda``, on the mamba-ssm kernels, for Mamba, Mamba-2 and Jamba. **In bf16 it is
not guaranteed**: bf16 keeps 8 bits of mantissa (a rounding step of 4e-3 relative), enough to flip close choices,
after which a sequence continues differently; ``bench/generation_speed.py`` reports the share of identical outputs
and the task metric both ways.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

# Where each architecture's config says whether in_proj has a bias.
IN_PROJ_BIAS = {"mamba": "use_bias", "mamba2": "use_bias", "jamba": "mamba_proj_bias"}


def pads_exactly(model: PreTrainedModel) -> bool:
    """Whether left padding leaves every prompt's tokens as they would be alone (see the module docstring)."""
    config = model.config
    return not getattr(config, IN_PROJ_BIAS.get(config.model_type, "use_bias"), False)


def batches(prompts: list[list[int]], batch_size: int, mixed_lengths: bool) -> list[list[int]]:
    """Indices of ``prompts`` in batches of at most ``batch_size``, longest first (so that padding is short and
    the largest batch comes first: an out-of-memory shows at once); with ``mixed_lengths`` off, a batch holds
    prompts of one length only."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    result: list[list[int]] = []
    for index in order:
        last = result[-1] if result else None
        if (
            last is None
            or len(last) == batch_size
            or (not mixed_lengths and len(prompts[last[0]]) != len(prompts[index]))
        ):
            result.append([index])
        else:
            last.append(index)
    return result


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    num_beams: int,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int,
) -> list[list[int]]:
    """The generated tokens of every prompt (greedy for ``num_beams`` 1, else beam search), in the prompts' order,
    each cut after its first ``eos_token_id``. ``batch_size`` prompts decode together (times ``num_beams``
    sequences)."""
    device = next(model.parameters()).device
    outputs: list[list[int]] = [[] for _ in prompts]
    for indices in batches(prompts, batch_size, mixed_lengths=pads_exactly(model)):
        width = max(len(prompts[i]) for i in indices)
        input_ids = torch.full((len(indices), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, index in enumerate(indices):
            prompt = prompts[index]
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )[:, width:].tolist()
        for index, tokens in zip(indices, generated):
            outputs[index] = tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens
    return outputs
