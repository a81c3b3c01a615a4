"""The Mamba-2 hybrids (docs/hybrids.md) on tiny configs saved and reloaded through ``from_pretrained``, CPU, fp32:
SDT + LoRA on the SSM mixers and LoRA on attention and MLP layers through warmup, selection and training; what moved
and what did not; save -> load and merge to identical logits; a Trainer run; each family's quirk; and transformers'
default config of each family (real dimensions) through ``sdt.plan`` and ``sdt.apply`` on the meta device."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import HYBRID_CONFIGS, hybrid_config
from helpers import assert_mamba2_invariants, changed_entries, logits, warmup_select_train
from transformers import AutoConfig, AutoModelForCausalLM

import sdt
from sdt import parametrize as P
from sdt.targets import family_of, layer_lora_plan

HYBRIDS = list(HYBRID_CONFIGS)
CONFIG = sdt.SDTConfig(lora_rank=2, lora_alpha=2.0, warmup_steps=2, inputs_frozen=0.5)


@pytest.fixture
def load_hybrid(hybrid_model_dirs):
    def load(arch: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(hybrid_model_dirs[arch], dtype=torch.float32)

    return load


def lora_weights(model: torch.nn.Module, config: sdt.SDTConfig) -> set[str]:
    """The qualified names of the attention, MLP and expert weights that carry LoRA (every depth of a shared
    block)."""
    return {
        f"{name}.{attribute}" if kind.kind.stacked else f"{name}.{attribute}.weight"
        for kind in layer_lora_plan(model, config)
        for name, _ in kind.layers
        for attribute in kind.attributes
    }


# LoRA on the routed experts too: one low-rank pair per expert on their stacked weights
EXPERTS = dataclasses.replace(CONFIG, expert_lora_targets=("gate", "up", "down"))
LIFECYCLES = [(arch, CONFIG) for arch in HYBRIDS] + [("granitemoehybrid", EXPERTS), ("nemotron_h", EXPERTS)]


@pytest.mark.parametrize(
    ("arch", "config"), LIFECYCLES, ids=[*HYBRIDS, "granitemoehybrid-experts", "nemotron_h-experts"]
)
def test_a_hybrid_trains_only_its_selection_and_lora_targets_and_reloads_and_merges(
    arch, config, load_hybrid, tmp_path
):
    model = load_hybrid(arch)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    layers = sdt.mixers(load_hybrid(arch))
    attention_and_mlp = lora_weights(model, config)
    assert attention_and_mlp, "the default covers the attention and MLP layers"
    tuner = sdt.apply(model, config)
    selection = warmup_select_train(tuner)  # the coverage guard runs at the first step of both phases
    expected = logits(tuner.model)
    assert not torch.equal(expected, logits(load_hybrid(arch)))  # training changed the function

    sdt.save(tuner, tmp_path / "adapter")
    reloaded = sdt.load(load_hybrid(arch), tmp_path / "adapter")
    assert torch.equal(logits(reloaded.model), expected)

    sdt.save_merged(tuner, tmp_path / "merged")
    merged = copy.deepcopy(tuner).merge()
    assert torch.equal(logits(merged), expected)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert type(plain).__name__ == type(model).__name__
    assert torch.equal(logits(plain), expected)

    after = merged.state_dict()
    ssm_keys = {k for k in base if any(k.startswith(f"{prefix}.") for prefix, _ in layers)}
    # the SSM mixers: only the selected heads' A_log, B/C entries and out_proj (LoRA) moved
    assert_mamba2_invariants({k: base[k] for k in ssm_keys}, after, selection, layers)
    # elsewhere only the LoRA-carrying attention and MLP weights moved, every one of them
    moved = set(changed_entries({k: v for k, v in base.items() if k not in ssm_keys}, after))
    assert moved == attention_and_mlp


@pytest.mark.parametrize("arch", HYBRIDS)
def test_the_coverage_guard_names_a_lora_tensor_a_forward_skipped(arch, load_hybrid):
    tuner = sdt.apply(load_hybrid(arch), sdt.SDTConfig.preset("lora", lora_targets=["out_proj"], lora_rank=2))
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    tuner.model.train()
    tuner.model(input_ids=tokens, labels=tokens).loss.backward()
    tuner.check_gradients()
    (_, attention), *_ = [(n, m) for n, m in tuner.model.named_modules() if n.endswith("q_proj")]
    adapter = attention.parametrizations.weight[0]
    adapter.lora_A.grad = None
    with pytest.raises(sdt.AdapterCoverageError, match="q_proj"):
        tuner.check_gradients()


COVERAGE = {
    "bamba": "layers: mamba 2/2 (SDT+LoRA), attention 1/1 (LoRA), mlp 3/3 (LoRA)",
    "granitemoehybrid": "layers: mamba 2/2 (SDT+LoRA), attention 1/1 (LoRA), mlp 3/3 (LoRA), experts 0/3",
    "nemotron_h": "layers: mamba 2/2 (SDT+LoRA), attention 1/1 (LoRA), mlp 2/2 (LoRA), experts 0/1",
    "falcon_h1": "layers: mamba 2/2 (SDT+LoRA), attention 2/2 (LoRA), mlp 2/2 (LoRA)",
    "zamba2": "layers: mamba 4/4 (SDT+LoRA), attention 1/1 (LoRA, shared by 2 depths), mlp 1/1 (LoRA, shared by 2 "
    "depths)",
}


@pytest.mark.parametrize("arch", HYBRIDS)
def test_apply_with_no_config_covers_the_whole_model_and_the_plan_says_so(arch, load_hybrid):
    model = load_hybrid(arch)
    lines = sdt.plan(model, sdt.SDTConfig()).lines()
    assert COVERAGE[arch] in lines
    tuner = sdt.apply(model)
    lora = {id(a) for _, a in P.adapters(model) if isinstance(a, P.LowRankDelta)}
    # out_proj of every mixer, and every attention / MLP weight that takes LoRA, each shared weight once
    modules = [model.get_submodule(name.removesuffix(".weight")) for name in lora_weights(model, tuner.config)]
    distinct = {id(P.original(module, "weight")) for module in modules}
    assert len(lora) == len(sdt.mixers(model)) + len(distinct)


def test_attention_and_mlp_lora_are_configurable_per_layer_type(load_hybrid):
    model = load_hybrid("granitemoehybrid")
    config = sdt.SDTConfig(attention_lora_targets=["q", "v"], mlp_lora_targets=[], lora_rank=2)
    plan = sdt.plan(model, config)
    assert "layers: mamba 2/2 (SDT+LoRA), attention 1/1 (LoRA), mlp 0/3, experts 0/3" in plan.lines()
    # r2 on q (16 -> 16) and v (16 -> 8, one key-value head): 2 · (16 + 16) + 2 · (16 + 8)
    assert "1 × GraniteMoeHybridAttention: LoRA r2 on q_proj, v_proj: 112 trainable parameters each" in plan.lines()
    tuner = sdt.apply(model, config)
    adapted = {n.split(".parametrizations")[0] for n, _ in tuner.named_trainable_parameters() if "lora_A" in n}
    assert {n.rsplit(".", 1)[1] for n in adapted} == {"q_proj", "v_proj", "out_proj"}
    # the baseline "LoRA on attention and MLP only": no SSM parameter trains
    lora_only = sdt.SDTConfig.preset(
        "lora", lora_targets=[], attention_lora_targets=["q", "k", "v", "o"], mlp_lora_targets=["gate", "up", "down"]
    )
    assert "mamba 0/2" in sdt.plan(load_hybrid("granitemoehybrid"), lora_only).lines()[-2]


@pytest.mark.parametrize(
    ("arch", "overrides", "field", "message"),
    [
        ("granitemoehybrid", {"expert_lora_targets": ["up"], "lora_variant": "dora"}, "lora_variant", "plain lora"),
        ("nemotron_h", {"mlp_lora_targets": ["gate"]}, "mlp_lora_targets", "touch nothing: NemotronHMLP has up, down"),
        ("falcon_h1", {"expert_lora_targets": ["up"]}, "expert_lora_targets", "has no such layers"),
    ],
)
def test_a_layer_setting_that_touches_nothing_names_its_field(arch, overrides, field, message, load_hybrid):
    with pytest.raises(sdt.SDTConfigError, match=message) as error:
        sdt.apply(load_hybrid(arch), sdt.SDTConfig(**overrides))
    assert error.value.field == field


def test_a_layer_setting_on_a_pure_ssm_or_a_hybrid_without_that_layer_names_its_field(load_base, load_hybrid):
    with pytest.raises(sdt.SDTConfigError, match="has no such layers") as error:
        sdt.plan(load_base("mamba2"), sdt.SDTConfig(attention_lora_targets=["q"]))
    assert error.value.field == "attention_lora_targets"
    bamba = AutoModelForCausalLM.from_config(hybrid_config("bamba", attn_layer_indices=[]))
    with pytest.raises(sdt.SDTConfigError, match="has no attention layer") as error:
        sdt.apply(bamba, sdt.SDTConfig(attention_lora_targets=["q"]))
    assert error.value.field == "attention_lora_targets"
    with pytest.raises(sdt.SDTConfigError, match="trains no LoRA") as error:
        sdt.SDTConfig.preset("sdt", mlp_lora_targets=["up"])
    assert error.value.field == "mlp_lora_targets"


def test_sdt_alone_and_full_fine_tuning_leave_the_other_layers_as_their_method_says(load_hybrid):
    lines = sdt.plan(load_hybrid("bamba"), sdt.SDTConfig.preset("sdt")).lines()
    assert "layers: mamba 2/2 (SDT), attention 0/1, mlp 0/3" in lines
    assert sdt.plan(load_hybrid("bamba"), sdt.SDTConfig.preset("full")).lines()[0].startswith("every weight trains")


def test_falcon_h1_b_c_rows_follow_its_own_ssm_width(load_hybrid):
    """mamba_d_ssm (32) is not expand × hidden (48): the B/C rows start after z and x of mamba_d_ssm each."""
    model = load_hybrid("falcon_h1")
    (_, mixer), *_ = sdt.mixers(model)
    assert mixer.intermediate_size == 32 and model.config.mamba_expand * model.config.hidden_size == 48
    (_, bc), *_ = [(s.key, s.rows) for s in family_of(model).warmup_specs(mixer) if s.key == "BC"]
    assert bc == (64, 64 + 2 * 2 * 8)


def test_falcon_h1_multipliers_scale_what_the_adapters_add(load_hybrid):
    """In weight space an adapter on in_proj is part of in_proj's weight, so mup_vector scales its output exactly as
    it scales the base's: the update the warmup delta makes is seen times its rows' multiplier."""
    model = load_hybrid("falcon_h1")
    tuner = sdt.apply(model, CONFIG)
    (_, mixer), *_ = sdt.mixers(model)
    hidden = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(0))
    before = mixer.in_proj(hidden * mixer.ssm_in_multiplier) * mixer.mup_vector
    dense = next(a for a in mixer.in_proj.parametrizations.weight if isinstance(a, P.DenseDelta))
    start, stop = dense.rows
    with torch.no_grad():
        dense.delta.fill_(0.5)
    after = mixer.in_proj(hidden * mixer.ssm_in_multiplier) * mixer.mup_vector
    added = (after - before)[..., start:stop]
    expected = (hidden * mixer.ssm_in_multiplier).sum(-1, keepdim=True) * 0.5 * mixer.mup_vector[..., start:stop]
    # fp32 sums of 16 terms in two orders
    torch.testing.assert_close(added, expected.expand_as(added), atol=1e-5, rtol=1e-5)
    assert set(mixer.mup_vector[0, 0, start:stop].tolist()) == {1.5, 0.75}  # the B and the C multipliers
    assert tuner.phase == "warmup"


def test_zamba2_shared_block_has_one_adapter_at_every_depth(load_hybrid):
    model = load_hybrid("zamba2")
    tuner = sdt.apply(model, CONFIG)
    first, second = (layer.shared_transformer for layer in model.model.layers if hasattr(layer, "shared_transformer"))
    assert first is not second and P.original(first.self_attn.q_proj, "weight") is P.original(
        second.self_attn.q_proj, "weight"
    )
    assert first.self_attn.q_proj.parametrizations.weight[0] is second.self_attn.q_proj.parametrizations.weight[0]
    counted = [n for n, _ in tuner.named_trainable_parameters() if "q_proj" in n]
    assert len(counted) == 2  # lora_A and lora_B, once


def test_falcon_mamba_is_refused_in_one_line():
    config = AutoConfig.for_model("falcon_mamba", vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=8)
    with pytest.raises(sdt.UnsupportedModelError, match=r"falcon_mamba.*RMSNorms") as error:
        sdt.apply(AutoModelForCausalLM.from_config(config))
    assert "\n" not in str(error.value)


# transformers' default config of each family (its real dimensions), with the defaults: sdlora, LoRA r8. The
# defaults are transformers' own: Bamba-9B and Granite's without attention layers, Nemotron-H's 4-layer pattern.
DEFAULT_PLANS = {
    "bamba": (
        "layers: mamba 32/32 (SDT+LoRA), attention 0/0, mlp 32/32 (LoRA)",
        "trainable: 17,469,696 of 9,992,765,440 parameters (0.175%)",
    ),
    "granitemoehybrid": (
        "layers: mamba 32/32 (SDT+LoRA), attention 0/0, mlp 32/32 (LoRA), experts 0/32",
        "trainable: 6,197,504 of 38,601,064,448 parameters (0.0161%)",
    ),
    "nemotron_h": (
        "layers: mamba 1/1 (SDT+LoRA), attention 1/1 (LoRA), mlp 2/2 (LoRA), experts 0/1",
        "trainable: 912,072–930,440 of 1,968,355,712 parameters (0.0463%–0.0473%)",
    ),
    "falcon_h1": (
        "layers: mamba 32/32 (SDT+LoRA), attention 32/32 (LoRA), mlp 32/32 (LoRA)",
        "trainable: 22,450,432 of 8,514,961,408 parameters (0.264%)",
    ),
    "zamba2": (
        "layers: mamba 54/54 (SDT+LoRA), attention 1/1 (LoRA, shared by 9 depths), mlp 1/1 (LoRA, shared by 9 depths)",
        "trainable: 3,956,662 of 2,481,848,336 parameters (0.159%)",
    ),
}


@pytest.mark.parametrize("arch", HYBRIDS)
def test_default_config_of_each_family_on_the_meta_device(arch):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch))
    plan = sdt.plan(model, sdt.SDTConfig())
    assert plan.lines()[-2:] == list(DEFAULT_PLANS[arch])
    tuner = sdt.apply(model)
    low, high = plan.trainable
    assert tuner.phase == "warmup"
    updates = {p: {k: torch.ones(v.shape) for k, v in u.items()} for p, u in tuner.warmup_updates().items()}
    selection = tuner.select(updates)  # a meta tensor has no values: every entry ranks alike
    tuner.start_training(selection)
    assert low <= tuner.num_trainable_parameters() <= high


@pytest.mark.parametrize("arch", HYBRIDS)
def test_a_trainer_runs_the_phases_and_its_saved_model_reloads(arch, load_hybrid, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'sdtune[hf]')")
    from test_trainer_integration import Tokens, arguments
    from transformers import Trainer

    from sdt.integrations.trainer import train_sdt

    tuner = sdt.apply(load_hybrid(arch), dataclasses.replace(CONFIG, warmup_steps=1))
    args = arguments(tmp_path / "run", max_steps=2, save_strategy="no")
    trainer = Trainer(model=tuner.model, args=args, train_dataset=Tokens(size=8))
    output = train_sdt(trainer, tuner)  # the coverage guard runs at the first step of each phase
    assert tuner.phase == "train" and output.global_step == 2
    trainer.save_model(str(tmp_path / "final"))
    reloaded = sdt.load(load_hybrid(arch), tmp_path / "final")
    assert torch.equal(logits(reloaded.model), logits(tuner.model))


@pytest.mark.parametrize("arch", HYBRIDS)
def test_trl_runs_the_phases_under_gradient_checkpointing(arch, load_hybrid, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'sdtune[hf]')")
    from test_trl_integration import texts, word_tokenizer

    from sdt.integrations.trainer import train_sdt

    tuner = sdt.apply(load_hybrid(arch), dataclasses.replace(CONFIG, warmup_steps=1))
    # TRL 1.16's MoE load-balancing loss reads config.num_experts, which Granite-4.0-H's config calls
    # num_local_experts (an AttributeError in TRL, with or without sdt): the auxiliary loss off for it
    moe = {"router_aux_loss_coef": 0.0} if arch == "granitemoehybrid" else {}
    args = trl.SFTConfig(  # fp32 (TRL's default is bf16 autocast); SFTConfig turns gradient checkpointing on
        output_dir=str(tmp_path / "run"),
        max_length=16,
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        bf16=False,
        **moe,
    )
    trainer = trl.SFTTrainer(
        model=tuner.model, args=args, train_dataset=texts(size=8), processing_class=word_tokenizer()
    )
    assert trainer.args.gradient_checkpointing
    output = train_sdt(trainer, tuner)  # the coverage guard runs at the first step of each phase
    assert tuner.phase == "train" and output.global_step == 2
