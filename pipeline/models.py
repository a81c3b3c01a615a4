"""Base models: which kernel path transformers picked, so a slow fallback on CUDA is never silent."""

from __future__ import annotations

import importlib
import inspect

# The kernel entry points each architecture's modeling module routes through mamba-ssm / causal-conv1d.
KERNEL_FUNCTIONS = {
    "mamba": ("mamba_inner_fn", "mamba_selective_scan", "causal_conv1d_fn"),
    "jamba": ("mamba_selective_scan", "causal_conv1d_fn"),
    "mamba2": ("mamba2_split_conv1d_scan_combined", "mamba2_chunk_scan", "causal_conv1d_fn"),
}


def kernel_paths(model_type: str) -> dict[str, str]:
    """For each kernel entry point of ``model_type``, the package that implements it ("pytorch" = the fallback).

    transformers wraps each entry point at import time and keeps the chosen implementation in the wrapper's
    closure; reading it back is the only way to know which path a model will run.
    """
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    paths = {}
    for name in KERNEL_FUNCTIONS[model_type]:
        implementation = inspect.getclosurevars(getattr(module, name)).nonlocals["implementation"]
        package = implementation.__module__.split(".")[0]
        paths[name] = "pytorch" if package == "transformers" else package
    return paths
