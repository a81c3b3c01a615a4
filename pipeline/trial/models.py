"""Base models: loading a job's base (checkpoint, fresh architecture or the builtin digits base) in its compute
dtype (and the CPU threads a worker computes with), and which kernel path transformers picked, so a slow fallback on
CUDA is never silent."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.util import find_spec
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import sdt
from pipeline.compat.transformers import kernel_implementation
from pipeline.spec.job import ModelSpec, ResourcesSpec
from pipeline.trial.progress import WORKER_WARNING

logger = logging.getLogger(__name__)

# The kernel entry points each architecture's modeling module routes through mamba-ssm / causal-conv1d.
KERNEL_FUNCTIONS = {
    "mamba": ("mamba_inner_fn", "mamba_selective_scan", "causal_conv1d_fn"),
    "jamba": ("mamba_selective_scan", "causal_conv1d_fn"),
    "mamba2": ("mamba2_split_conv1d_scan_combined", "mamba2_chunk_scan", "causal_conv1d_fn"),
}
# the Mamba-2 hybrids' modeling modules route their mixers through the same entry points
KERNEL_FUNCTIONS.update(
    dict.fromkeys(("bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "zamba2"), KERNEL_FUNCTIONS["mamba2"])
)


def kernel_paths(model_type: str) -> dict[str, str]:
    """For each kernel entry point of ``model_type``, the package that implements it ("pytorch" = the fallback)."""
    paths = {}
    for name in KERNEL_FUNCTIONS[model_type]:
        package = kernel_implementation(model_type, name).__module__.split(".")[0]
        paths[name] = "pytorch" if package == "transformers" else package
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Loading the base model of a job

# Weights of an `architecture` model are drawn under this seed, so every Ray worker builds the same model.
ARCHITECTURE_SEED = 0
KERNEL_INSTALL_HINT = 'pip install --no-build-isolation ".[cuda]"'


def compute_dtype(spec: ModelSpec, device: torch.device | str) -> torch.dtype:
    """``spec.dtype`` as a torch dtype; "auto" is bf16 on CUDA and fp32 elsewhere."""
    if spec.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec.dtype]


def cpu_threads(resources: ResourcesSpec) -> int:
    """torch's threads in a worker on the CPU: its whole CPUs, at least one."""
    return max(1, int(resources.cpus_per_worker))


def load_base_model(
    spec: ModelSpec, device: torch.device | str, log: Callable[[str], Any] = logger.info
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model and tokenizer of ``spec``, cast to :func:`compute_dtype` (A_log and D stay fp32) on ``device``.

    * ``name_or_path``: ``from_pretrained`` in fp32 (cast afterwards, so A_log never passes through bf16);
      tokenizer from ``spec.tokenizer`` or the same path.
    * ``architecture``: ``AutoConfig.for_model(architecture, **spec.config)`` with weights drawn on ``device`` under
      a fixed seed (:data:`ARCHITECTURE_SEED`): every call on that kind of device builds the same model. The
      tokenizer is ``spec.tokenizer`` if given, else the digits tokenizer; unless ``spec.config`` sets them,
      ``vocab_size`` defaults to the tokenizer's length and bos / eos / pad ids to the tokenizer's.
    * ``builtin: digits``: the digits base (:func:`pipeline.tasks.digits.ensure_digits_base`: the shipped one, or
      pretrained on first use).

    Remote code runs only when ``spec.trust_remote_code`` is set. A tokenizer longer than ``model.config.vocab_size``
    is a ValueError. Logs the kernel path the model will run through ``log``; on CUDA a reference-PyTorch fallback
    is also a WARNING on this module's logger.
    """
    device = torch.device(device)
    trust = {"trust_remote_code": True} if spec.trust_remote_code else {}
    if spec.architecture is not None:
        model, tokenizer = fresh_model(spec, device, trust)
        log(f"base model: fresh {spec.architecture} (seed {ARCHITECTURE_SEED}), {_size(model)}")
    else:
        path = pretrained_path(spec, log)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **trust)
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or path, **trust)
        log(f"base model: {path}, {_size(model)}")

    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but model.config.vocab_size is {model.config.vocab_size}: "
            "ids past the embedding would fail; set model.config.vocab_size to at least the tokenizer's length"
        )
    dtype = compute_dtype(spec, device)
    sdt.to_compute_dtype(model, dtype)
    model.to(device)
    model.eval()
    log_kernel_paths(model.config.model_type, device, log, getattr(model.config, "use_mambapy", False))
    return model, tokenizer


def fresh_model(
    spec: ModelSpec, device: torch.device, trust: dict[str, bool]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``spec.architecture`` built from :func:`fresh_config` with weights drawn under :data:`ARCHITECTURE_SEED`, and
    its tokenizer."""
    config, tokenizer = fresh_config(spec, trust)
    # Built where it will run: initialising a 1.4b model on the host takes minutes of the trial's GPU time.
    # The weights then come from that device's generator: the same on every call, not across device types.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(ARCHITECTURE_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **trust)
    return model, tokenizer


def fresh_config(spec: ModelSpec, trust: dict[str, bool]) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The config of ``spec.architecture`` and its tokenizer (``spec.tokenizer``, else the digits tokenizer), whose
    length and special ids are the config's defaults."""
    from pipeline.tasks.digits import digits_tokenizer  # imports datasets; keep `kernel_paths` light

    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, **trust) if spec.tokenizer else digits_tokenizer()
    defaults = {"vocab_size": len(tokenizer)}
    eos = tokenizer.eos_token_id
    for key, value in (
        ("bos_token_id", tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos),
        ("eos_token_id", eos),
        ("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos),
    ):
        if value is not None:
            defaults[key] = value
    return AutoConfig.for_model(spec.architecture, **{**defaults, **spec.config}), tokenizer


def pretrained_path(spec: ModelSpec, log: Callable[[str], Any]) -> str:
    """Where the pretrained base of ``spec`` loads from: ``name_or_path``, or the cached built-in base."""
    if spec.builtin is None:
        return spec.name_or_path
    from pipeline.tasks.digits import ensure_digits_base  # imports datasets; keep `kernel_paths` light

    if spec.builtin != "digits":
        raise ValueError(f"unknown builtin base {spec.builtin!r}")
    return str(ensure_digits_base(log=log))


def log_kernel_paths(
    model_type: str, device: torch.device | str, log: Callable[[str], Any] = logger.info, use_mambapy: bool = False
) -> dict[str, str]:
    """Log which implementation each kernel entry point of ``model_type`` runs; on CUDA, warn about fallbacks."""
    if model_type not in KERNEL_FUNCTIONS:
        log(f"kernel path for {model_type}: no mamba kernels (not a Mamba, Mamba-2 or Jamba model)")
        return {}
    paths = kernel_paths(model_type)
    line = f"kernel path for {model_type}: " + ", ".join(f"{name}={package}" for name, package in paths.items())
    if model_type == "mamba" and use_mambapy and paths["mamba_selective_scan"] == "pytorch" and find_spec("mambapy"):
        line += " (selective scan through mambapy's parallel scan)"
    log(line)
    slow = [name for name, package in paths.items() if package == "pytorch"]
    if slow and torch.device(device).type == "cuda":
        message = (
            f"{model_type} runs {', '.join(slow)} on the slow reference PyTorch path on CUDA (mamba-ssm / "
            f"causal-conv1d kernels missing): install them with {KERNEL_INSTALL_HINT}"
        )
        logger.warning(message)
        if log != logger.info:  # the caller's sink gets it too (bound methods compare equal, never identical)
            log(f"{WORKER_WARNING}{message}")
    return paths


def _size(model: PreTrainedModel) -> str:
    count = sum(p.numel() for p in model.parameters())
    return f"{model.config.model_type}, {count / 1e6:.2f}M parameters"
