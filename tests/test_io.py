"""Save -> load into a fresh base -> same logits; merge -> same logits; merged model loads in plain transformers."""

import json

import pytest
import torch
from helpers import logits, train, warmup_select_train
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sdt
from sdt import SDTConfig

CONFIGS = {
    "mamba": SDTConfig(channels_frozen=0.75, states_frozen=0.5, lora_rank=2, lora_alpha=4),
    "jamba": SDTConfig(channels_frozen=24, states_frozen=5, lora_rank=2, lora_alpha=2),
    "mamba2": SDTConfig(channels_frozen=5, states_frozen=0.5, inputs_frozen=0.75, lora_rank=2, lora_alpha=2),
}


def trained_tuner(load_base, arch, config=None):
    tuner = sdt.apply(load_base(arch), config or CONFIGS[arch])
    if tuner.phase == "warmup":
        warmup_select_train(tuner, warmup_steps=2, train_steps=4)
    else:
        train(tuner, 4)
    return tuner


@pytest.mark.parametrize("arch", ["mamba", "jamba", "mamba2"])
def test_save_load_merge_roundtrip(arch, load_base, tmp_path):
    tuner = trained_tuner(load_base, arch)
    expected = logits(tuner.model)
    assert not torch.allclose(expected, logits(load_base(arch)))  # training changed the function
    adapter_dir = sdt.save(tuner, tmp_path / "adapter", metadata={"base_model": "tiny"})
    names = sorted(p.name for p in adapter_dir.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "config.json"]  # config.json: a marker

    reloaded = sdt.load(load_base(arch), adapter_dir)
    assert reloaded.phase == "train"
    assert torch.equal(logits(reloaded.model), expected)

    merged = reloaded.merge()
    assert not any("parametrizations" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)

    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)


def test_adapter_files_hold_tensors_and_json_only(load_base, tmp_path):
    tuner = trained_tuner(load_base, "mamba")
    sdt.save(tuner, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["sdt"]["method"] == "sdlora" and config["phase"] == "train"
    assert config["num_trainable_parameters"] == tuner.num_trainable_parameters()
    assert config["selected"]["backbone.layers.0.mixer"] == {"channels": [8], "states": [8, 4]}
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert torch.equal(
        tensors["sdt_selection.backbone.layers.1.mixer.channels"],
        tuner.selection["backbone.layers.1.mixer"]["channels"],
    )
    assert "backbone.layers.0.mixer.out_proj.parametrizations.weight.0.lora_B" in tensors
    assert not any(k.endswith(".original") for k in tensors)  # base weights are not part of the adapter


@pytest.mark.parametrize("preset", ["lora", "full", "sdt"])
def test_other_methods_roundtrip(preset, load_base, tmp_path):
    overrides = {"channels_frozen": 0.75, "states_frozen": 0.5} if preset == "sdt" else {}
    tuner = trained_tuner(load_base, "mamba", SDTConfig.preset(preset, **overrides))
    expected = logits(tuner.model)
    reloaded = sdt.load(load_base("mamba"), sdt.save(tuner, tmp_path / preset))
    assert torch.equal(logits(reloaded.model), expected)
    torch.testing.assert_close(logits(reloaded.merge()), expected, atol=1e-5, rtol=0)


def test_warmup_phase_roundtrip_resumes_the_same_updates(load_base, tmp_path):
    tuner = sdt.apply(load_base("mamba"), CONFIGS["mamba"])
    train(tuner, 2)
    reloaded = sdt.load(load_base("mamba"), sdt.save(tuner, tmp_path / "warm"))
    assert reloaded.phase == "warmup"
    before, after = tuner.warmup_updates(), reloaded.warmup_updates()
    assert all(torch.equal(before[p]["A_log"], after[p]["A_log"]) for p in before)


def test_save_replaces_atomically_and_refuses_a_foreign_model(load_base, tmp_path):
    tuner = trained_tuner(load_base, "mamba")
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    sdt.save(tuner, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging or retired dirs left over
    assert not (target / "stale.txt").exists()
    with pytest.raises(ValueError, match="model type 'mamba', not 'mamba2'"):
        sdt.load(load_base("mamba2"), target)


def test_failed_write_leaves_the_previous_adapter(tmp_path):
    target = tmp_path / "adapter"
    sdt.write_atomically(target, lambda d: (d / "ok.json").write_text("{}"))

    def crash(d):
        (d / "half.json").write_text("{")
        raise OSError("disk full")

    with pytest.raises(OSError):
        sdt.write_atomically(target, crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in target.iterdir()) == ["ok.json"]
