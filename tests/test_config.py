import pytest

import sdt
from sdt import SDTConfig, trainable_count


def test_sdlora_preset_matches_the_paper_defaults():
    cfg = SDTConfig.preset("sdlora")
    assert (cfg.method, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == ("sdlora", 8, 8.0, ("out_proj",))
    assert (cfg.sdt_targets, cfg.warmup_steps) == (("A_log", "B", "C"), 500)
    # the counts are left to each family's rule; on Mamba-1 that is the paper's 0.99 / 0.75 (test_defaults.py)
    assert cfg.channels_frozen is cfg.states_frozen is cfg.inputs_frozen is None
    assert SDTConfig() == cfg


def test_presets_and_overrides():
    assert SDTConfig.preset("sdt").lora_targets == ()
    assert SDTConfig.preset("lora").sdt_targets == ()
    assert SDTConfig.preset("full").lora_targets == SDTConfig.preset("full").sdt_targets == ()
    cfg = SDTConfig.preset("lora", lora_rank=2, lora_targets=["in_proj", "out_proj"])
    assert (cfg.lora_rank, cfg.lora_targets) == (2, ("in_proj", "out_proj"))
    assert SDTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("frozen", "size", "expected"),
    [
        (0.99, 1536, 15),  # 130m: round(1520.64) = 1521 frozen, 15 train (docs/method.md §4)
        (0.99, 4096, 41),  # 1.4b
        (0.99, 5120, 51),  # 2.8b
        (0.75, 16, 4),
        (0.9, 16, 2),  # round(14.4) = 14
        (0.95, 16, 1),  # round(15.2) = 15
        (0.5, 5, 3),  # round(2.5) = 2 (banker's rounding), 3 train
        (0.7, 5, 1),  # round(3.5) = 4 (banker's rounding), 1 trains
        (12, 16, 4),  # an int is an absolute count of frozen entries
        (0, 16, 16),
        (1.0, 16, 0),
    ],
)
def test_trainable_count_rounds_like_the_official_code(frozen, size, expected):
    assert trainable_count(frozen, size) == expected


def test_int_and_float_counts_are_not_confused():
    assert trainable_count(1, 16) == 15  # int 1: one frozen
    assert trainable_count(1.0, 16) == 0  # float 1.0: everything frozen


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "adapter"}, "method"),
        ({"lora_targets": ("conv1d",)}, "lora_targets"),
        ({"sdt_targets": ("D",)}, "sdt_targets"),
        ({"channels_frozen": 1.5}, "channels_frozen"),
        ({"states_frozen": -1}, "states_frozen"),
        ({"states_frozen": True}, "states_frozen"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"method": "sdt", "lora_targets": ("out_proj",)}, "lora_targets"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SDTConfig(**kwargs)


def test_unknown_method_names_the_field():
    with pytest.raises(sdt.SDTConfigError, match=r"^method: 'qlora' is not one of sdlora, sdt, lora, full") as error:
        SDTConfig.preset("qlora")
    assert error.value.field == "method"


def test_too_many_frozen_is_rejected():
    with pytest.raises(ValueError, match="channels_frozen: freezes 20 of only 16"):
        trainable_count(20, 16, field_name="channels_frozen")


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "jamba"])
def test_counts_are_checked_on_a_meta_skeleton_before_any_training(arch, tiny_model_dirs):
    """check_counts raises the selection's error from shapes alone, on a model without weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dirs[arch]))
    workable = {"channels_frozen": 2, "states_frozen": 0.5, "inputs_frozen": 0.5}
    sdt.check_counts(skeleton, SDTConfig(**workable))
    # no SDT: nothing to select; but the LoRA targets must exist in the mixer
    sdt.check_counts(skeleton, SDTConfig.preset("lora", channels_frozen=1.0, lora_targets=("out_proj",)))
    with pytest.raises(ValueError, match=r"^channels_frozen: 1\.0 freezes all"):
        sdt.check_counts(skeleton, SDTConfig(**{**workable, "channels_frozen": 1.0}))
    with pytest.raises(ValueError, match=r"^states_frozen: 1\.0 freezes all"):
        sdt.check_counts(skeleton, SDTConfig(**{**workable, "states_frozen": 1.0}))


# -- the method registry is the one vocabulary --------------------------------------------------------------


def test_the_pipeline_accepts_exactly_the_registered_methods():
    """Every method and LoRA variant name the job spec accepts comes from sdt's registries, and nothing else."""
    from pipeline.spec.job import JobSpecError, parse_job

    def accepted(method: dict) -> bool:
        try:
            parse_job({"name": "m", "model": {"builtin": "digits"}, "method": method})
        except JobSpecError as error:
            assert error.where.startswith("method."), error
            return False
        return True

    for name, method in sdt.METHODS.items():
        defaults = SDTConfig.preset(name)
        assert accepted({"name": name}), name
        assert isinstance(method.summary, str) and method.summary
        assert defaults.trains_all_weights == method.trains_all_weights
    for name in sdt.VARIANTS:
        assert accepted({"name": "lora", "lora_variant": name}), name
    assert not accepted({"name": "qlora"}) and not accepted({"name": "lora", "lora_variant": "vera"})


def test_method_spec_mirrors_the_sdt_config():
    """MethodSpec's fields are SDTConfig's: ``name`` is its ``method``, the seed comes from training.seed."""
    import dataclasses

    from pipeline.spec.job import MethodSpec

    sdt_fields = {field.name for field in dataclasses.fields(SDTConfig)} - {"method", "seed"}
    assert set(MethodSpec.model_fields) - {"name"} == sdt_fields


def test_sdt_config_errors_carry_the_field_as_data():
    from pipeline.spec.job import JobSpecError, parse_job

    with pytest.raises(sdt.SDTConfigError) as error:
        SDTConfig.preset("lora", lora_targets=())
    assert (error.value.field, error.value.reason) == (
        "lora_targets",
        "method 'lora' needs at least one of in_proj, x_proj, dt_proj, out_proj",
    )
    with pytest.raises(JobSpecError) as spec_error:
        parse_job(
            {"name": "m", "model": {"builtin": "digits"}, "method": {"name": "sdt", "lora_targets": ["out_proj"]}}
        )
    assert spec_error.value.where == "method.lora_targets"
