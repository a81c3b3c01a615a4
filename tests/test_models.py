"""pipeline.tasks.digits and pipeline.trial.models: the shipped digits base, rebuilding it, and loading a job's
base model on CPU.

One test rebuilds the real default base (~40-70 s on 2 cores) and compares it with the shipped one; the rest use
the shipped base, a reduced config or tiny models.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

from pipeline.spec.job import ModelSpec
from pipeline.tasks.digits import (
    DIGITS_BASE,
    SHIPPED_BASE,
    PretrainConfig,
    digits_base_dir,
    digits_pixel_sequences,
    digits_tokenizer,
    ensure_digits_base,
    next_pixel_loss,
    pretrain_digits_base,
)
from pipeline.trial.models import compute_dtype, load_base_model, log_kernel_paths
from sdt import mixers

SMALL = PretrainConfig(hidden=16, layers=1, state=4, steps=12, batch=16, lr=1e-2, seed=3)
TINY_MAMBA2 = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "state_size": 8,
    "num_heads": 8,
    "head_dim": 4,
    "n_groups": 2,
    "expand": 2,
    "chunk_size": 8,
}


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_ssm_fp32(model):
    for _, mixer in mixers(model):
        assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# pretraining


def test_pretrain_is_reproducible_and_learns(tmp_path):
    results = [pretrain_digits_base(tmp_path / name, SMALL, log=lambda _: None) for name in ("a", "b")]
    first, second = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert results[0] == {**results[1], "seconds": results[0]["seconds"]}
    assert results[0]["steps"] == SMALL.steps
    assert results[0]["final_loss"] < results[0]["initial_loss"]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert isinstance(model, MambaForCausalLM)
    assert model.config.hidden_size == SMALL.hidden and model.config.num_hidden_layers == SMALL.layers
    assert len(tokenizer) == len(digits_tokenizer()) == model.config.vocab_size
    assert tokenizer("0 16 ###")["input_ids"] == digits_tokenizer()("0 16 ###")["input_ids"] == [0, 16, 17]
    # Pixel value 0 is token 0: the special ids must point at the tokenizer's eos, not MambaConfig's default 0.
    assert model.config.eos_token_id == model.config.pad_token_id == tokenizer.eos_token_id == 18
    info = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    assert info["config"] == {"hidden": 16, "layers": 1, "state": 4, "steps": 12, "batch": 16, "lr": 1e-2, "seed": 3}
    assert info["final_loss"] == results[0]["final_loss"]


def test_ensure_digits_base_caches_by_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "env-cache"))
    assert digits_base_dir(config=SMALL).parent == tmp_path / "env-cache"
    assert digits_base_dir(tmp_path, SMALL).parent == tmp_path
    assert digits_base_dir(tmp_path, SMALL) != digits_base_dir(tmp_path, PretrainConfig(**{**vars(SMALL), "seed": 4}))
    assert digits_base_dir(tmp_path, DIGITS_BASE) != digits_base_dir(tmp_path, SMALL)

    messages = []
    path = ensure_digits_base(config=SMALL, log=messages.append)
    assert path == digits_base_dir(config=SMALL) and path.is_dir()
    assert any("pretraining" in m for m in messages)
    info, mtime = (path / "pretrain.json").read_text(), (path / "model.safetensors").stat().st_mtime_ns
    # Nothing but the base and its lock file: no staging directory is left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f".{path.name}.lock"])

    messages.clear()
    assert ensure_digits_base(config=SMALL, log=messages.append) == path
    assert messages == []  # reused: no training
    assert (path / "pretrain.json").read_text() == info
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_publish_keeps_a_base_that_appeared_meanwhile(tmp_path):
    """A worker that finishes training after another published keeps the published copy."""
    from pipeline.tasks.digits import _publish

    target = tmp_path / "digits-base-x"
    _publish(target, lambda tmp: (tmp / "pretrain.json").write_text("first"))
    _publish(target, lambda tmp: (tmp / "pretrain.json").write_text("second"))
    assert (target / "pretrain.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["digits-base-x"]


def test_the_default_base_ships_and_no_one_pretrains_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path))
    messages = []
    assert ensure_digits_base(log=messages.append) == SHIPPED_BASE
    assert messages == [] and list(tmp_path.iterdir()) == []
    sizes = {path.name: path.stat().st_size for path in SHIPPED_BASE.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "pretrain.json"} <= set(sizes)
    assert sum(sizes.values()) < 400_000


def test_the_rebuilt_base_matches_the_shipped_one(tmp_path):
    """`sdtune pretrain` rebuilds the default base from its recipe: the same weights up to float rounding, and the
    same held-out next-pixel loss. Not bit for bit: the summation order of the matrix products depends on the CPU
    and the thread count, and 200 Adam steps carry last-bit differences into the weights (on a 2-core machine with
    the shipped base's torch 2.13.0+cpu: 2.5e-6 at most, and the losses 2.2e-7 apart). A change of the recipe moves
    them by far more: another seed draws other initial weights, and another learning rate changes every update
    (Adam moves a weight by about the learning rate per step, 5e-3 at its peak)."""
    from typer.testing import CliRunner

    from pipeline.cli.commands import app

    result = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "rebuilt")])
    assert result.exit_code == 0, result.output
    assert f"digits base rebuilt in {tmp_path / 'rebuilt'}: validation loss " in result.output
    from pipeline.tasks.digits import compare_bases

    comparison = compare_bases(tmp_path / "rebuilt", SHIPPED_BASE)
    # 40x the rounding difference measured (2.5e-6), 50x below one Adam step at the recipe's peak lr (5e-3)
    assert comparison["max_weight_difference"] < 1e-4, comparison
    # 45x the rounding difference measured (2.2e-7); the loss moves with every weight, so a recipe change moves it more
    assert comparison["validation_loss"] == pytest.approx(comparison["reference_validation_loss"], abs=1e-5)
    rebuilt = json.loads((tmp_path / "rebuilt" / "pretrain.json").read_text())
    shipped = json.loads((SHIPPED_BASE / "pretrain.json").read_text())
    assert rebuilt["hash"] == shipped["hash"] and rebuilt["config"] == shipped["config"] == vars(DIGITS_BASE)


def test_default_base_knows_the_digits():
    """The default base predicts held-out pixels far better than a random init of its shape, and better than
    per-position pixel frequencies of the training images (so it uses the context)."""
    path = SHIPPED_BASE
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    validation = torch.tensor(digits_pixel_sequences("validation"))
    trained = next_pixel_loss(model, validation)
    torch.manual_seed(0)
    untrained = next_pixel_loss(MambaForCausalLM(AutoConfig.from_pretrained(path)), validation)

    train = torch.tensor(digits_pixel_sequences("train"))
    counts = torch.stack([torch.bincount(train[:, i], minlength=20) for i in range(train.shape[1])]).float() + 1
    frequencies = counts / counts.sum(dim=1, keepdim=True)
    positional = -frequencies.log()[torch.arange(1, train.shape[1]), validation[:, 1:]].mean().item()

    info = json.loads((path / "pretrain.json").read_text())
    assert info["config"] == vars(DIGITS_BASE) and info["validation_loss"] == pytest.approx(trained, rel=1e-4)
    assert trained < untrained - 1.0, (trained, untrained)
    assert trained < positional - 0.1, (trained, positional)


# ---------------------------------------------------------------------------------------------------------------
# load_base_model


def test_compute_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype(ModelSpec(builtin="digits"), cpu) == torch.float32
    assert compute_dtype(ModelSpec(builtin="digits"), cuda) == torch.bfloat16
    assert compute_dtype(ModelSpec(builtin="digits", dtype="bfloat16"), cpu) == torch.bfloat16
    assert compute_dtype(ModelSpec(builtin="digits", dtype="float32"), cuda) == torch.float32


def test_load_from_path(tmp_path):
    tokenizer = digits_tokenizer()
    torch.manual_seed(0)
    saved = MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, state_size=8))
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    messages = []
    model, loaded_tokenizer = load_base_model(ModelSpec(name_or_path=str(tmp_path)), "cpu", log=messages.append)
    assert isinstance(model, MambaForCausalLM) and model.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert_ssm_fp32(model)
    assert any(m.startswith("kernel path for mamba: mamba_inner_fn=") for m in messages), messages

    model, _ = load_base_model(ModelSpec(name_or_path=str(tmp_path), dtype="bfloat16"), "cpu", log=messages.append)
    assert model.lm_head.weight.dtype == model.backbone.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
    assert_ssm_fp32(model)
    reference = saved.backbone.layers[0].mixer.A_log
    assert torch.equal(model.backbone.layers[0].mixer.A_log, reference)  # not round-tripped through bf16


def test_load_architecture_is_deterministic(caplog):
    spec = ModelSpec(architecture="mamba2", config=TINY_MAMBA2)
    state = torch.random.get_rng_state()
    with caplog.at_level(logging.INFO, logger="pipeline.trial.models"):
        model, tokenizer = load_base_model(spec, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert "kernel path for mamba2: mamba2_split_conv1d_scan_combined=" in caplog.text
    assert isinstance(model, Mamba2ForCausalLM) and model.config.model_type == "mamba2"
    assert model.dtype == torch.float32
    assert_ssm_fp32(model)
    # Digits tokenizer by default; vocab and special ids follow it unless the config sets them.
    assert tokenizer.get_vocab() == digits_tokenizer().get_vocab()
    assert model.config.vocab_size == len(tokenizer) and model.config.eos_token_id == tokenizer.eos_token_id

    torch.manual_seed(123)  # a different global seed must not change the build
    again, _ = load_base_model(spec, torch.device("cpu"), log=lambda _: None)
    first, second = model.state_dict(), again.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)

    with pytest.raises(ValueError, match=r"model\.config\.vocab_size is 8"):
        load_base_model(
            ModelSpec(architecture="mamba", config={"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1}), "cpu"
        )


def test_load_builtin_digits():
    messages = []
    model, tokenizer = load_base_model(ModelSpec(builtin="digits"), torch.device("cpu"), log=messages.append)
    assert not any("pretraining" in m for m in messages), messages  # the shipped base, as it is
    assert isinstance(model, MambaForCausalLM) and model.dtype == torch.float32
    assert_ssm_fp32(model)
    assert model.config.hidden_size == DIGITS_BASE.hidden and len(tokenizer) == model.config.vocab_size
    assert any(m.startswith("kernel path for mamba: ") for m in messages), messages
    expected = weights(SHIPPED_BASE)
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items() if key in expected)


def test_slow_kernel_path_on_cuda_is_a_warning(caplog):
    """On this CPU machine every entry point is the PyTorch fallback: on a CUDA device that must warn."""
    messages = []
    with caplog.at_level(logging.INFO, logger="pipeline.trial.models"):
        paths = log_kernel_paths("mamba", torch.device("cuda"), log=messages.append)
        log_kernel_paths("mamba", torch.device("cpu"), log=messages.append)
    assert set(paths.values()) == {"pytorch"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "slow reference PyTorch path" in warnings[0].getMessage()
    assert 'pip install --no-build-isolation ".[cuda]"' in warnings[0].getMessage()
    assert [m.split(":")[0] for m in messages] == ["kernel path for mamba", "WARNING", "kernel path for mamba"]
