"""Adapters as files a user can trust: ``model.save_pretrained`` of a tuned model writes the adapter, a plain
``from_pretrained`` refuses it, ``sdt.save_merged`` writes a plain model, and a damaged, edited or mismatched
adapter fails to load with one message that names the file (issue 11)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from helpers import logits, warmup_select_train
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MambaForCausalLM

import sdt
from sdt.io import CONFIG_NAME, WEIGHTS_NAME

CONFIG = sdt.SDTConfig(channels_frozen=0.75, states_frozen=0.5, lora_rank=2, lora_alpha=8.0, warmup_steps=2)


@pytest.fixture
def trained(load_base) -> sdt.Tuner:
    tuner = sdt.apply(load_base("mamba"), CONFIG)
    warmup_select_train(tuner, warmup_steps=2, train_steps=2)
    return tuner


@pytest.fixture
def adapter_dir(trained, tmp_path):
    return sdt.save(trained, tmp_path / "adapter")


def test_save_pretrained_of_a_tuned_model_writes_the_adapter_next_to_other_files(trained, load_base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # what a Trainer puts there first stays
    trained.model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "config.json", "tokenizer.json"]
    assert not any(k.endswith(".original") for k in load_file(out / WEIGHTS_NAME))  # no base weights
    assert torch.equal(logits(sdt.load(load_base("mamba"), out).model), logits(trained.model))


def test_a_plain_from_pretrained_refuses_an_adapter_directory(trained, load_base, tmp_path):
    """The config.json marker: the Auto classes stop at its model type, which says what to do; a model class, even
    given the base's config, finds no weights."""
    trained.model.save_pretrained(tmp_path / "out")
    refusal = "model type `sdt_adapter \\(an SDT/LoRA adapter, not a model: load it with sdt.load"
    with pytest.raises(ValueError, match=refusal):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for kwargs in ({}, {"config": load_base("mamba").config}):
        with pytest.raises(OSError, match=r"no file named model\.safetensors"):
            MambaForCausalLM.from_pretrained(tmp_path / "out", **kwargs)


def test_save_merged_writes_a_plain_model_and_the_tuner_trains_on(trained, tmp_path):
    expected = logits(trained.model)
    sdt.save_merged(trained, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)
    assert trained.phase == "train" and not trained.merged
    assert torch.equal(logits(trained.model), expected)
    merged = trained.merge()  # the class's save_pretrained again: a full plain save
    assert "save_pretrained" not in vars(merged)


def test_adapter_files_get_the_umask_mode_not_0600(adapter_dir):
    mask = os.umask(0)
    os.umask(mask)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert stat.S_IMODE((adapter_dir / name).stat().st_mode) == 0o666 & ~mask, name


def test_the_config_records_the_checksum_and_the_header_the_config(adapter_dir):
    description = json.loads((adapter_dir / CONFIG_NAME).read_text())
    assert len(description["weights_sha256"]) == 64
    with safe_open(str(adapter_dir / WEIGHTS_NAME), "pt") as f:
        saved_with = json.loads(f.metadata()["sdt_adapter"])
    assert saved_with == {"phase": "train", "model_type": "mamba", "sdt": CONFIG.to_dict()}


def edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    description = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = description
        for key in parents:
            target = target[key]
        target[last] = value
    path.write_text(json.dumps(description))


def rewrite_tensors(directory, change):
    """Rewrite adapter_model.safetensors with ``change(tensors)`` applied, keeping its header."""
    path = directory / WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata=header)


def fill_with_nan(tensors):
    key = next(k for k in tensors if k.endswith("lora_B"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))


def truncate(directory):
    path = directory / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])


CORRUPTIONS = {
    "truncated": (truncate, WEIGHTS_NAME, "unreadable: truncated or not a safetensors file"),
    "nan-filled": (lambda d: rewrite_tensors(d, fill_with_nan), WEIGHTS_NAME, "sha256 is not the one"),
    "lora_alpha 8 -> 800": (
        lambda d: edit_config(d, sdt__lora_alpha=800.0),
        CONFIG_NAME,
        "sdt.lora_alpha is 800.0, saved as 8.0",
    ),
    "rank edited": (lambda d: edit_config(d, sdt__lora_rank=4), CONFIG_NAME, "sdt.lora_rank is 4, saved as 2"),
    "not JSON": (lambda d: (d / CONFIG_NAME).write_text("{'sdt':"), CONFIG_NAME, "not valid JSON"),
    "bad alpha": (lambda d: edit_config(d, sdt__lora_alpha=-1.0), CONFIG_NAME, "lora_alpha"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_or_edited_adapter_fails_naming_the_file(corruption, adapter_dir, load_base):
    damage, file_name, message = CORRUPTIONS[corruption]
    damage(adapter_dir)
    with pytest.raises(sdt.AdapterFileError, match=message) as error:
        sdt.load(load_base("mamba"), adapter_dir)
    assert str(error.value).startswith(f"{adapter_dir / file_name}: ")
    assert error.value.path == adapter_dir / file_name


def drop_checksum(directory):
    path = directory / CONFIG_NAME
    description = json.loads(path.read_text())
    del description["weights_sha256"]
    path.write_text(json.dumps(description))


def test_a_diverged_adapter_is_refused(trained, tmp_path, load_base):
    """Saved as it was, checksum and all, from a run that went to NaN / inf: loading refuses it."""
    with torch.no_grad():
        trained.model.sdt_sparse["A_log"].delta[0] = float("inf")
    directory = sdt.save(trained, tmp_path / "diverged")
    with pytest.raises(sdt.AdapterFileError, match=f"{directory / WEIGHTS_NAME}: NaN or inf in sdt_sparse.A_log.delta"):
        sdt.load(load_base("mamba"), directory)


def test_without_its_checksum_an_adapter_is_still_checked_for_nan(adapter_dir, load_base):
    """Adapters saved before the checksum existed: NaN still fails (and tensors that do not fit, below)."""
    drop_checksum(adapter_dir)
    rewrite_tensors(adapter_dir, fill_with_nan)
    with pytest.raises(sdt.AdapterFileError, match=r"NaN or inf in backbone\.layers\.0\.mixer\.out_proj"):
        sdt.load(load_base("mamba"), adapter_dir)


def test_tensors_that_do_not_fit_the_config_are_named(adapter_dir, load_base):
    drop_checksum(adapter_dir)
    key = "backbone.layers.0.mixer.out_proj.parametrizations.weight.0.lora_A"

    def widen(tensors):
        tensors[key] = torch.zeros(3, tensors[key].shape[1])

    rewrite_tensors(adapter_dir, widen)
    with pytest.raises(sdt.AdapterFileError, match=f"{key} \\(3, 32\\) where the config makes \\(2, 32\\)"):
        sdt.load(load_base("mamba"), adapter_dir)
    rewrite_tensors(adapter_dir, lambda tensors: tensors.pop(key))
    with pytest.raises(sdt.AdapterFileError, match=f"missing \\['{key}'\\]"):
        sdt.load(load_base("mamba"), adapter_dir)


def test_a_directory_without_an_adapter_points_at_its_checkpoints(adapter_dir, tmp_path, load_base):
    run = tmp_path / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / CONFIG_NAME).write_text("{}")
    with pytest.raises(sdt.AdapterFileError, match=r"no adapter here .* Trainer checkpoints \(checkpoint-4\)"):
        sdt.load(load_base("mamba"), run)


def test_restore_moves_a_warmup_tuner_to_the_saved_selection(trained, adapter_dir, load_base):
    fresh = sdt.apply(load_base("mamba"), CONFIG)
    model = fresh.model
    sdt.io.restore(fresh, adapter_dir)
    assert fresh.model is model and fresh.phase == "train"
    assert torch.equal(logits(model), logits(trained.model))
    sdt.io.restore(fresh, adapter_dir)  # again: the same selection, tensors reloaded
    other = sdt.apply(load_base("mamba"), sdt.SDTConfig(**{**CONFIG.to_dict(), "lora_alpha": 4}))
    with pytest.raises(sdt.AdapterFileError, match=r"than this tuner's \(lora_alpha is 4, saved as 8\.0\)"):
        sdt.io.restore(other, adapter_dir)
