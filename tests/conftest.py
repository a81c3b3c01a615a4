"""Tiny Mamba / Mamba-2 / Jamba models, saved once and loaded back through ``from_pretrained`` like a user's."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

from helpers import VOCAB

TINY_CONFIGS = {
    "mamba": (MambaForCausalLM, MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=8)),
    "mamba2": (
        Mamba2ForCausalLM,
        Mamba2Config(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=8, num_heads=8, head_dim=4,
            n_groups=2, expand=2, chunk_size=8,
        ),
    ),
    "jamba": (
        JambaForCausalLM,
        JambaConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=1,
            expert_layer_period=2, expert_layer_offset=1, num_experts=2, intermediate_size=32,
            num_attention_heads=2, num_key_value_heads=1, mamba_d_state=8, mamba_dt_rank=4,
        ),
    ),
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for arch, (model_class, config) in TINY_CONFIGS.items():
        torch.manual_seed(1234)
        path = tmp_path_factory.mktemp(f"base-{arch}")
        model_class(config).save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


@pytest.fixture
def load_base(tiny_model_dirs):
    """``load_base(arch)`` -> a fresh fp32 copy of that tiny base model, loaded from disk."""

    def load(arch: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)

    return load


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A private sdtune cache holding the default digits base, pretrained once per test session.

    Exported as SDTUNE_CACHE so that `sdtune` subprocesses and their Ray workers find it too.
    """
    from pipeline.pretrain import CACHE_ENV, ensure_digits_base

    cache = tmp_path_factory.mktemp("sdtune-cache")
    ensure_digits_base(cache, log=lambda _: None)
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)
    yield cache
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous
