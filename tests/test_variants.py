"""LoRA variants through the seam (sdt/variants/): DoRA in weight space trains, saves, loads and merges like LoRA."""

from __future__ import annotations

import pytest
import torch
from helpers import logits, random_tokens, train

import sdt

DORA = sdt.SDTConfig.preset("lora", lora_variant="dora", lora_targets=("x_proj", "dt_proj", "out_proj"))


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "jamba"])
def test_dora_starts_as_the_base_and_trains_magnitude_and_direction(load_base, arch):
    targets = ("in_proj", "out_proj") if arch == "mamba2" else DORA.lora_targets
    config = sdt.SDTConfig.preset("lora", lora_variant="dora", lora_targets=targets)
    base = load_base(arch)
    before = logits(base)
    tuner = sdt.apply(base, config)
    torch.testing.assert_close(logits(tuner.model), before, atol=1e-6, rtol=0)  # m = ‖W0‖ and B = 0: W' = W0
    names = [name for name, _ in tuner.named_trainable_parameters()]
    assert {name.rsplit(".", 1)[-1] for name in names} == {"lora_A", "lora_B", "magnitude"}
    train(tuner, 3)  # the coverage guard checks every factor and magnitude after the first backward
    assert not torch.equal(logits(tuner.model), before)


def test_dora_is_the_papers_function(load_base):
    """W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖ (row norms), against a direct computation."""
    tuner = sdt.apply(load_base("mamba"), DORA)
    train(tuner, 2)
    module = tuner.model.backbone.layers[0].mixer.out_proj
    adapter = module.parametrizations.weight[0]
    w0 = module.parametrizations.weight.original.detach().float()
    direction = w0 + adapter.scaling * (adapter.lora_B @ adapter.lora_A).detach()
    expected = adapter.magnitude.detach()[:, None] * direction / direction.norm(dim=1, keepdim=True)
    torch.testing.assert_close(module.weight.detach(), expected, atol=1e-6, rtol=1e-6)


def test_dora_saves_loads_and_merges(load_base, tmp_path):
    tuner = sdt.apply(load_base("mamba"), DORA)
    train(tuner, 3)
    adapted = logits(tuner.model)
    sdt.save(tuner, tmp_path / "adapter")
    loaded = sdt.load(load_base("mamba"), tmp_path / "adapter")
    assert loaded.config.lora_variant == "dora"
    torch.testing.assert_close(logits(loaded.model), adapted, atol=1e-6, rtol=0)
    merged = loaded.merge()
    assert not any("parametrizations" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, random_tokens(seed=7)), adapted, atol=1e-5, rtol=1e-5)
