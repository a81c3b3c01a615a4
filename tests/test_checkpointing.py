"""Gradient checkpointing (transformers' own, reentrant and not) gives the same gradients as none, in both SDT
phases, on tiny Mamba, Mamba-2 and Jamba models (fp32, CPU); and a tuned model deep-copies cleanly."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_tokens, train

import sdt

ARCHS = ["mamba", "mamba2", "jamba"]
WORKABLE = {"channels_frozen": 2, "states_frozen": 0.5, "inputs_frozen": 0.5, "warmup_steps": 2}


def tuned(load_base, arch: str, phase: str) -> sdt.Tuner:
    """An sdlora tuner in ``phase``, with LoRA on every projection the architecture has and nonzero adapters."""
    targets = ("in_proj", "out_proj") if arch == "mamba2" else ("in_proj", "x_proj", "dt_proj", "out_proj")
    torch.manual_seed(0)
    tuner = sdt.apply(load_base(arch), sdt.SDTConfig(lora_targets=targets, **WORKABLE))
    train(tuner, 2, seed=10)  # LoRA B and the dense deltas leave zero
    if phase == "train":
        tuner.start_training(tuner.select())
        train(tuner, 2, seed=20)
    return tuner


def gradients(tuner: sdt.Tuner) -> dict[str, torch.Tensor]:
    tuner.model.train()
    tuner.model.zero_grad(set_to_none=True)
    tokens = random_tokens(seed=3)
    tuner.model(input_ids=tokens, labels=tokens).loss.backward()
    return {name: p.grad.clone() for name, p in tuner.named_trainable_parameters()}


@pytest.mark.parametrize("phase", ["warmup", "train"])
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_gives_the_same_gradients(load_base, arch, phase):
    tuner = tuned(load_base, arch, phase)
    plain = gradients(tuner)
    for reentrant in (False, True):
        tuner.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        checkpointed = gradients(tuner)
        tuner.model.gradient_checkpointing_disable()
        assert checkpointed.keys() == plain.keys()
        for name, grad in plain.items():
            assert torch.count_nonzero(grad), name
            torch.testing.assert_close(
                checkpointed[name], grad, atol=1e-6, rtol=0, msg=f"{name} (reentrant={reentrant})"
            )


def test_a_deep_copy_shares_nothing_with_the_original(load_base):
    """The copy's forward uses its own sparse deltas: changing the original's leaves the copy's logits alone."""
    tuner = tuned(load_base, "mamba", "train")
    clone = copy.deepcopy(tuner.model)
    tokens = random_tokens(seed=5)
    with torch.no_grad():
        before = clone(input_ids=tokens).logits
        for group in tuner.model.sdt_sparse.values():
            group.delta.add_(1.0)
        after = clone(input_ids=tokens).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert not torch.equal(tuner.model(input_ids=tokens).logits, before)
