"""The default SDT counts (a config field left unset): each family's rule, what it trains at every Mamba-2 head
count, what ``sdt.plan`` says it trains, and the real sizes it is written down for (docs/mamba2.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import hybrid_config
from helpers import VOCAB, assert_mamba2_invariants, warmup_select_train
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig

import sdt
from sdt import SDTConfig

DOCS = Path(__file__).resolve().parent.parent / "docs" / "mamba2.md"
STATES, LAYERS = 8, 2
# (heads, hidden size): expand 2, so head_dim = 2 * hidden / heads (8, 4, 2 and 1)
SHAPES = [(8, 32), (24, 48), (64, 64), (128, 64)]


def paper_rule(frozen: float, size: int) -> int:
    """The paper's frozen fraction, rounded as Python rounds (banker's), at least one trains."""
    return max(1, size - round(frozen * size))


def documented_mamba2_counts(heads: int, hidden: int) -> tuple[int, int, int]:
    """(heads, B/C rows per block and group, inputs per row) that the default trains, as docs/mamba2.md states it:
    1 in 16 heads rounded up; the paper's 0.75 of the states and 0.99 of the inputs frozen; at least one each."""
    return math.ceil(heads / 16), paper_rule(0.75, STATES), paper_rule(0.99, hidden)


def tiny_mamba2(heads: int, hidden: int, groups: int) -> Mamba2ForCausalLM:
    torch.manual_seed(0)
    config = Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=LAYERS,
        state_size=STATES,
        num_heads=heads,
        head_dim=2 * hidden // heads,
        n_groups=groups,
        expand=2,
        chunk_size=8,
    )
    return Mamba2ForCausalLM(config)


def on_meta(config) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize(("heads", "hidden"), SHAPES, ids=[f"{h}heads" for h, _ in SHAPES])
def test_the_default_config_trains_every_head_count(heads, hidden, groups):
    """apply, warmup, selection and training with SDTConfig() as it is; the count is the documented rule's, inside
    the plan's range; every base entry outside the selection (and out_proj's LoRA) comes back bit-identical."""
    model = tiny_mamba2(heads, hidden, groups)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    layers = sdt.mixers(tiny_mamba2(heads, hidden, groups))
    plan = sdt.plan(model, SDTConfig())
    tuner = sdt.apply(model, SDTConfig())
    selection = warmup_select_train(tuner)  # the first step of each phase runs the coverage guard

    k_h, k_s, k_d = documented_mamba2_counts(heads, hidden)
    expected = 0
    for prefix, _ in layers:
        chosen = selection[prefix]
        kept_groups = len(chosen["groups"])
        assert chosen["channels"].shape == (k_h,) and chosen["states"].shape == (kept_groups, k_s)
        assert chosen["inputs"].shape == (kept_groups, k_s, k_d)
        assert math.ceil(k_h / (heads // groups)) <= kept_groups <= min(k_h, groups)
        lora = 8 * (hidden + 2 * hidden)  # r8 on out_proj (hidden x inner)
        expected += k_h + 2 * kept_groups * k_s * k_d + lora
    assert tuner.num_trainable_parameters() == expected
    assert plan.trainable[0] <= expected <= plan.trainable[1]
    merged = {k: v.detach().clone() for k, v in tuner.merge().state_dict().items()}
    assert_mamba2_invariants(base, merged, selection, layers)


def test_a_set_ratio_is_honoured_exactly_and_zero_heads_is_an_error():
    model = tiny_mamba2(24, 48, 8)
    plan = sdt.plan(model, SDTConfig(channels_frozen=20, states_frozen=0.5, inputs_frozen=40))
    [(layer, count)] = plan.layers
    assert count == LAYERS and layer.parts[:3] == (
        "heads 4/24",
        "B/C rows 8/16 in each of 2–4 of 8 groups",
        "inputs 8/48 per row",
    )
    for value in (0.99, 24):  # a fraction that rounds to all 24 heads, a count of all of them
        with pytest.raises(sdt.SDTConfigError, match=f"^channels_frozen: {value!r} freezes all 24 heads of ") as error:
            sdt.apply(model, SDTConfig(channels_frozen=value))
        assert "backbone.layers.0.mixer" in str(error.value) and "leave it unset for the default" in str(error.value)


def test_n_groups_that_does_not_divide_the_heads_is_refused_naming_the_field():
    model = on_meta(Mamba2Config(hidden_size=48, num_hidden_layers=2, num_heads=24, head_dim=4, n_groups=5))
    for call in (sdt.apply, sdt.check_counts):
        with pytest.raises(sdt.UnsupportedModelError, match=r"^n_groups: 5 does not divide num_heads 24 ") as error:
            call(model, SDTConfig.preset("lora", lora_targets=("out_proj",)))  # also without SDT
        assert error.value.field == "n_groups"


def test_a_model_type_sdt_does_not_know_is_refused_naming_it():
    from transformers import LlamaConfig

    model = on_meta(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(sdt.UnsupportedModelError, match=r"^model_type: 'llama' is not supported; sdt handles mamba"):
        sdt.check_counts(model, SDTConfig.preset("full"))


def test_mamba1_defaults_are_the_papers_at_least_one():
    """The paper's 0.99 / 0.75 where they train something (mamba-130m: 15 channels, 4 states), one channel where
    0.99 would freeze them all (32 channels)."""
    at_130m = sdt.plan(on_meta(MambaConfig(hidden_size=768, num_hidden_layers=24)), SDTConfig())
    [(layer, count)] = at_130m.layers
    assert count == 24 and layer.parts[:2] == ("channels 15/1536 (default)", "states 4/16 per channel (default)")
    assert at_130m.trainable == (455_328, 455_328)  # jobs/README.md's SDLoRA at 0.75, x 24 layers
    tiny = sdt.plan(on_meta(MambaConfig(hidden_size=16, num_hidden_layers=2, state_size=8)), SDTConfig())
    assert tiny.layers[0][0].parts[:2] == ("channels 1/32 (default)", "states 2/8 per channel (default)")


def test_transformers_default_mamba2_goes_through_apply_on_the_meta_device_as_documented():
    """Mamba2Config() is a 7B model (64 layers, 128 heads in 8 groups, state 128, hidden 4096): apply attaches the
    warmup's adapters without allocating a weight, a training phase at a selection within the plan counts what the
    plan says, and docs/mamba2.md shows this plan."""
    config = Mamba2Config()
    plan = sdt.plan(on_meta(config), SDTConfig())
    docs = DOCS.read_text()
    missing = [line for line in plan.lines() if line not in docs]
    assert not missing, f"docs/mamba2.md does not show: {missing}"

    tuner = sdt.apply(on_meta(config), SDTConfig())
    assert tuner.phase == "warmup" and next(tuner.model.parameters()).device.type == "meta"
    # warmup: a dense delta on every A_log (128) and B/C row block (2 x 8 groups x 128 states x 4096 inputs), LoRA r8
    warmup_per_layer = 128 + 2 * 8 * 128 * 4096 + 8 * (8192 + 4096)
    assert tuner.num_trainable_parameters() == 64 * warmup_per_layer
    k_h, k_s, k_d = math.ceil(128 / 16), paper_rule(0.75, 128), paper_rule(0.99, 4096)
    for groups, end in ((torch.tensor([0]), 0), (torch.arange(8), 1)):  # the selected heads in 1 group, or in 8
        heads = groups * 16 if len(groups) == k_h else torch.arange(k_h)
        chosen = {
            "channels": heads,
            "groups": groups,
            "states": torch.arange(k_s).expand(len(groups), k_s),
            "inputs": torch.arange(k_d).expand(len(groups), k_s, k_d),
        }
        model = on_meta(config)
        selection = {prefix: chosen for prefix, _ in sdt.mixers(model)}
        assert sdt.Tuner(model, SDTConfig(), selection=selection).num_trainable_parameters() == plan.trainable[end]


def lora_modules_of_mixers(model: torch.nn.Module) -> set[str]:
    """The mixer projections that carry a LoRA, by attribute name."""
    return {
        name.split(".parametrizations.")[0].rpartition(".")[2]
        for name, _ in model.named_parameters()
        if name.endswith("lora_A") and any(part in name for part in (".mixer.", ".mamba."))
    }


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: AutoModelForCausalLM.from_config(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2)),
         {"x_proj", "dt_proj", "out_proj"}),
        (lambda: tiny_mamba2(8, 32, 1), {"in_proj", "out_proj"}),
        (lambda: AutoModelForCausalLM.from_config(hybrid_config("granitemoehybrid")), {"in_proj", "out_proj"}),
    ],
    ids=["mamba", "mamba2", "granitemoehybrid"],
)  # fmt: skip
def test_the_lora_preset_trains_the_familys_lora_modules(build, expected):
    """The lora preset names no modules: Mamba-1 takes the official baseline's x_proj, dt_proj and out_proj, a
    Mamba-2 mixer (which has neither x_proj nor dt_proj) in_proj and out_proj; modules a person sets are honoured."""
    model = build()
    tuner = sdt.apply(model, SDTConfig.preset("lora"))
    assert lora_modules_of_mixers(model) == expected
    assert tuner.config.lora_targets == tuple(m for m in ("in_proj", "x_proj", "dt_proj", "out_proj") if m in expected)
    chosen = build()
    sdt.apply(chosen, SDTConfig.preset("lora", lora_targets=["out_proj"]))
    assert lora_modules_of_mixers(chosen) == {"out_proj"}
