"""SDT phases on each architecture: what changes, what stays bit-identical, how many parameters train."""

import dataclasses

import pytest
import torch
from helpers import assert_mamba1_invariants, assert_mamba2_invariants, train, warmup_select_train

import sdt
from sdt import SDTConfig

# Small models need small ratios: 0.99 of 32 channels would freeze them all.
CONFIGS = {
    "mamba": SDTConfig(channels_frozen=0.75, states_frozen=0.5, lora_rank=2, lora_alpha=2),
    "jamba": SDTConfig(channels_frozen=24, states_frozen=5, lora_rank=2, lora_alpha=2),
    "mamba2": SDTConfig(channels_frozen=5, states_frozen=0.5, inputs_frozen=0.75, lora_rank=2, lora_alpha=2),
}


def merged_state(tuner):
    return {k: v.detach().clone() for k, v in tuner.merge().state_dict().items()}


@pytest.mark.parametrize("arch", ["mamba", "jamba"])
def test_mamba1_family_invariants(arch, load_base):
    model = load_base(arch)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = CONFIGS[arch]
    tuner = sdt.apply(model, cfg)
    assert tuner.phase == "warmup"
    selection = warmup_select_train(tuner)
    layers = sdt.mixers(load_base(arch))
    assert set(selection) == {prefix for prefix, _ in layers}
    assert [p for p, _ in sdt.mixers(tuner.model)] == [p for p, _ in layers]  # still found once parametrized

    r = cfg.lora_rank
    expected_trainable = 0
    for prefix, mixer in layers:
        channels, states = mixer.A_log.shape
        hidden = mixer.out_proj.weight.shape[0]
        k_c = sdt.trainable_count(cfg.channels_frozen, channels)
        k_s = sdt.trainable_count(cfg.states_frozen, states)
        assert selection[prefix]["channels"].shape == (k_c,)
        assert selection[prefix]["states"].shape == (k_c, k_s)
        expected_trainable += k_c * k_s + 2 * states * k_c + r * (channels + hidden)
    assert tuner.num_trainable_parameters() == expected_trainable

    assert_mamba1_invariants(base, merged_state(tuner), selection, layers)


def test_mamba2_invariants(load_base):
    model = load_base("mamba2")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = CONFIGS["mamba2"]
    tuner = sdt.apply(model, cfg)
    selection = warmup_select_train(tuner)
    layers = sdt.mixers(load_base("mamba2"))
    expected_trainable = 0
    for prefix, mixer in layers:
        heads, groups = mixer.num_heads, mixer.n_groups
        inner, hidden = mixer.intermediate_size, mixer.in_proj.weight.shape[1]
        k_h = sdt.trainable_count(cfg.channels_frozen, heads)
        k_s = sdt.trainable_count(cfg.states_frozen, mixer.ssm_state_size)
        k_d = sdt.trainable_count(cfg.inputs_frozen, hidden)
        # heads -> groups: a group is selected iff it holds a selected head
        assert set(selection[prefix]["groups"].tolist()) == {
            int(h) // (heads // groups) for h in selection[prefix]["channels"]
        }
        n_groups = selection[prefix]["groups"].numel()
        expected_trainable += k_h + 2 * n_groups * k_s * k_d + cfg.lora_rank * (inner + hidden)
    assert tuner.num_trainable_parameters() == expected_trainable
    assert_mamba2_invariants(base, merged_state(tuner), selection, layers)


def test_mamba2_sdlora_with_lora_on_in_proj(load_base):
    """LoRA and SDT share in_proj: the warmup's dense B/C delta sits behind LoRA in its chain, the training phase's
    sparse view before it. Without in_proj's LoRA, exactly the selected entries moved."""
    model = load_base("mamba2")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dataclasses.replace(CONFIGS["mamba2"], lora_targets=("in_proj", "out_proj"))
    tuner = sdt.apply(model, cfg)
    warmup_names = [n for n, _ in tuner.named_trainable_parameters()]
    assert any("in_proj.parametrizations.weight.0.lora_A" in n for n in warmup_names)
    assert any("in_proj.parametrizations.weight.1.delta" in n for n in warmup_names)  # the dense B/C delta
    selection = warmup_select_train(tuner)
    layers = sdt.mixers(load_base("mamba2"))
    expected_trainable = 0
    for prefix, mixer in layers:
        k_s = sdt.trainable_count(cfg.states_frozen, mixer.ssm_state_size)
        k_d = sdt.trainable_count(cfg.inputs_frozen, mixer.in_proj.weight.shape[1])
        k_h = sdt.trainable_count(cfg.channels_frozen, mixer.num_heads)
        lora = sum(cfg.lora_rank * sum(getattr(mixer, t).weight.shape) for t in cfg.lora_targets)
        expected_trainable += k_h + 2 * selection[prefix]["groups"].numel() * k_s * k_d + lora
    assert tuner.num_trainable_parameters() == expected_trainable
    for _, mixer in sdt.mixers(tuner.model):
        chain = mixer.in_proj.parametrizations.weight
        assert [type(p).__name__ for p in chain] == ["SparseDeltaView", "LowRankDelta"]
        assert torch.count_nonzero(chain[1].lora_B), "in_proj's LoRA did not train"
        with torch.no_grad():
            chain[1].lora_B.zero_()  # what is left of in_proj is SDT's alone
    assert_mamba2_invariants(base, merged_state(tuner), selection, layers)


def test_warmup_trains_a_dense_delta_and_restart_restores_the_base(load_base):
    model = load_base("mamba")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tuner = sdt.apply(model, CONFIGS["mamba"])
    # warmup trains the dense fp32 delta on A_log plus LoRA; B/C stay frozen (docs/method.md §2)
    names = [n for n, _ in tuner.named_trainable_parameters()]
    assert all(("A_log" in n and n.endswith(".delta")) or "lora_" in n for n in names)
    warmup_lora_a = dict(tuner.named_trainable_parameters())[
        "backbone.layers.0.mixer.out_proj.parametrizations.weight.0.lora_A"
    ]
    warmup_lora_a = warmup_lora_a.detach().clone()
    train(tuner, 3)
    updates = tuner.warmup_updates()
    delta = updates["backbone.layers.0.mixer"]["A_log"]
    assert delta.dtype == torch.float32 and delta.shape == model.backbone.layers[0].mixer.A_log.shape
    assert torch.count_nonzero(delta) == delta.numel()
    tuner.start_training(tuner.select(updates))
    # before any training step, the effective model equals the base exactly: fresh LoRA (B = 0), zero deltas
    tuner.model.eval()
    for name, value in base.items():
        module_name, _, tensor = name.rpartition(".")
        assert torch.equal(getattr(model.get_submodule(module_name), tensor), value), name
    # fresh LoRA, not warmup's
    fresh = dict(tuner.named_trainable_parameters())[
        "backbone.layers.0.mixer.out_proj.parametrizations.weight.0.lora_A"
    ]
    assert not torch.equal(fresh, warmup_lora_a)
    assert not any(
        "parametrizations.A_log.0.delta" in n and p.numel() == delta.numel()
        for n, p in tuner.named_trainable_parameters()
    )


def test_lora_and_full_presets(load_base):
    model = load_base("mamba")
    tuner = sdt.apply(model, SDTConfig.preset("lora", lora_rank=3))
    assert tuner.phase == "train"
    expected = 0
    for _, mixer in sdt.mixers(model):
        for target in ("x_proj", "dt_proj", "out_proj"):
            out_f, in_f = getattr(mixer, target).weight.shape
            expected += 3 * (out_f + in_f)
    assert tuner.num_trainable_parameters() == expected
    train(tuner, 2)

    full_model = load_base("mamba")
    full = sdt.apply(full_model, SDTConfig.preset("full"))
    assert full.num_trainable_parameters() == sum(p.numel() for p in full_model.parameters())
    train(full, 1)


def test_lora_on_a_module_mamba2_lacks(load_base):
    with pytest.raises(ValueError, match="lora_targets: \\['x_proj', 'dt_proj'\\] do not exist in Mamba2Mixer"):
        sdt.apply(load_base("mamba2"), SDTConfig.preset("lora", lora_targets=["x_proj", "dt_proj", "out_proj"]))


def test_ratio_that_freezes_every_channel_names_the_field_before_any_warmup(load_base):
    model = load_base("mamba")
    with pytest.raises(sdt.SDTConfigError, match=r"^channels_frozen: 0\.99 freezes all 32 channels of ") as error:
        sdt.apply(model, SDTConfig(channels_frozen=0.99))  # set by the user: 0.99 of 32 channels freezes all 32
    assert error.value.field == "channels_frozen" and "backbone.layers.0.mixer" in error.value.reason
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing was attached


def test_to_compute_dtype_keeps_a_log_and_d_in_fp32(load_base):
    model = sdt.to_compute_dtype(load_base("mamba"), torch.bfloat16)
    mixer = model.backbone.layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32
    assert mixer.x_proj.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
