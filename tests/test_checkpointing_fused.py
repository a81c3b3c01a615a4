"""Gradient checkpointing (transformers' own, reentrant and not) on sdt's fused path gives the gradients that the
fused path gives without it: on CPU with the pure-PyTorch reference kernels (fp32, exact up to 1e-6), and on the GPU
with the CUDA kernels (bf16, a ``cuda`` test: ``python -m pytest -m cuda tests/test_checkpointing_fused.py -v -s``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fused_reference import ReferenceKernels
from helpers import random_tokens, train
from test_fused_mamba import count_fused_calls
from transformers import MambaConfig, MambaForCausalLM

import sdt
from sdt.fused import install_fused_path, mamba1_mixers

WORKABLE = {"channels_frozen": 0.75, "states_frozen": 0.5, "warmup_steps": 2}
METHODS = {
    "sdlora": sdt.SDTConfig.preset("sdlora", lora_targets=("in_proj", "out_proj"), **WORKABLE),
    "lora": sdt.SDTConfig.preset("lora", lora_targets=("in_proj", "x_proj", "dt_proj", "out_proj")),
}


def gradients(tuner: sdt.Tuner, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    tuner.model.train()
    tuner.model.zero_grad(set_to_none=True)
    tuner.model(input_ids=tokens, labels=tokens).loss.backward()
    tuner.check_gradients()
    return {name: p.grad.float().clone() for name, p in tuner.named_trainable_parameters()}


def checkpointed_gradients(tuner: sdt.Tuner, tokens: torch.Tensor) -> dict[bool, dict[str, torch.Tensor]]:
    """Per use_reentrant, the gradients with transformers' gradient checkpointing on."""
    found = {}
    for reentrant in (False, True):
        tuner.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        found[reentrant] = gradients(tuner, tokens)
        tuner.model.gradient_checkpointing_disable()
    return found


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["mamba", "jamba"])
def test_checkpointing_on_the_fused_path_gives_the_same_gradients(load_base, arch, method, monkeypatch):
    tuner = sdt.apply(load_base(arch), METHODS[method])
    train(tuner, 2, seed=10)  # LoRA B and the dense deltas leave zero
    if tuner.phase == "warmup":
        tuner.start_training(tuner.select())
        train(tuner, 2, seed=20)
    assert "MambaInnerFn" in install_fused_path(tuner.model, kernels=ReferenceKernels())
    calls = count_fused_calls(monkeypatch)
    tokens = random_tokens(seed=3)
    plain = gradients(tuner, tokens)
    mixers = len(mamba1_mixers(tuner.model))
    assert len(calls) == mixers
    for reentrant, checkpointed in checkpointed_gradients(tuner, tokens).items():
        assert checkpointed.keys() == plain.keys()
        for name, grad in plain.items():
            context = f"{name} (use_reentrant={reentrant})"
            torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=context)
    assert len(calls) == 5 * mixers, "each checkpointed forward runs the fused path, and again when recomputed"


@pytest.mark.cuda
@pytest.mark.parametrize("method", list(METHODS))
def test_checkpointing_on_the_fused_cuda_path_gives_the_same_gradients(method, monkeypatch):
    """mamba-130m's width, 4 layers, bf16 with fp32 A_log/D, on the CUDA kernels that sdt.apply installs. The scan's
    backward accumulates with atomics, so two backward passes need not agree bit for bit: per tensor, the relative
    error against the plain pass may be at most the bf16 tolerance of tests/test_fused_cuda.py (1e-2), or twice
    what a second plain pass differs by."""
    config = MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=4, state_size=16)
    torch.manual_seed(0)
    model = sdt.to_compute_dtype(MambaForCausalLM(config), torch.bfloat16).cuda()
    tuner = sdt.apply(model, dataclasses.replace(METHODS[method], channels_frozen=0.99, states_frozen=0.75))
    assert "selective_scan_cuda" in tuner.kernel_path, tuner.kernel_path
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, 512), generator=generator).cuda()
    if tuner.phase == "warmup":
        optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=1e-2)
        for _ in range(2):
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        tuner.start_training(tuner.select())
    with torch.no_grad():
        for p in tuner.trainable_parameters():
            p.normal_(0, 0.02)
    calls = count_fused_calls(monkeypatch)
    plain = gradients(tuner, tokens)
    assert len(calls) == 4, "the fused path did not run"

    def relative_errors(grads: dict[str, torch.Tensor]) -> dict[str, float]:
        return {name: ((grads[name] - g).norm() / g.norm().clamp_min(1e-30)).item() for name, g in plain.items()}

    noise = relative_errors(gradients(tuner, tokens))
    for reentrant, checkpointed in checkpointed_gradients(tuner, tokens).items():
        errors = relative_errors(checkpointed)
        worst = max(errors, key=errors.get)
        print(
            f"\n{method}, use_reentrant={reentrant}: worst relative gradient error {errors[worst]:.2e} ({worst}); "
            f"a second plain pass: {noise[worst]:.2e}, at worst {max(noise.values()):.2e}"
        )
        bad = {name: e for name, e in errors.items() if e > max(1e-2, 2 * noise[name])}
        assert not bad, f"use_reentrant={reentrant}: relative errors {bad}"
