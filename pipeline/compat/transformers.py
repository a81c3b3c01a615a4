"""transformers' internals that the pipeline reads (sdt's own are in :mod:`sdt.compat.transformers`): which
implementation a Mamba modeling module's kernel entry point runs, and the logger of its kernel hints."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch

from sdt.compat import CompatError

# Where transformers logs its hints to install kernels (and that it falls back to PyTorch without them).
KERNEL_HINTS_LOGGER = "transformers.integrations.hub_kernels"


def kernel_implementation(model_type: str, name: str) -> Callable:
    """The function that the kernel entry point ``name`` of ``model_type``'s modeling module runs: mamba-ssm's or
    causal-conv1d's kernel, or transformers' PyTorch fallback.

    transformers wraps each entry point at import time and keeps the chosen implementation in the wrapper's
    closure (``implementation``); reading it back is the only way to know which path a model will run. Where the
    `kernels` package is installed (a dependency from transformers 5.25), that wrapper sits inside a `kernels`
    function module, whose forward calls it (its closure's ``func``) unless a model was kernelized with Hub kernels
    (sdtune never does)."""
    where = f"transformers.models.{model_type}.modeling_{model_type}"
    try:
        wrapper = getattr(importlib.import_module(where), name)
    except (ImportError, AttributeError) as error:
        raise CompatError("transformers", f"{where}.{name}", f"is gone ({error})") from None
    if isinstance(wrapper, torch.nn.Module):
        wrapper = closure_variable(type(wrapper).forward, "func", "kernels", f"the function module of {name}")
    return closure_variable(wrapper, "implementation", "transformers", f"{where}.{name}")


def closure_variable(function: Callable, variable: str, upstream: str, where: str) -> object:
    """The value of ``variable`` in ``function``'s closure."""
    try:
        return inspect.getclosurevars(function).nonlocals[variable]
    except (TypeError, KeyError):  # not a Python function, or no such variable
        raise CompatError(upstream, where, f"keeps no {variable!r} in its closure") from None
