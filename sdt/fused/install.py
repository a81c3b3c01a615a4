"""Putting the fused path on a model's Mamba-1 mixers, taking it off, and the one log line that says which runs."""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..compat.deepspeed import partitioned_by_zero3
from ..compat.mamba_ssm import load_cuda_kernels
from ..compat.transformers import has_accelerate_hooks, is_quantized
from .kernels import MambaKernels
from .mixer import KERNELS_ATTRIBUTE, forward
from .projections import describe, describe_small, kind_of

logger = logging.getLogger(__name__)

MIXER_CLASSES = ("MambaMixer", "JambaMambaMixer")
# the CUDA conv kernel's limits (causal_conv1d.cpp); the scan's state limit (256) is far above Mamba-1's 16
CONV_WIDTHS = range(2, 5)


def mamba1_mixers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Mamba-1 mixers (Mamba's, Jamba's mamba layers), matched along the MRO: parametrize subclasses them."""
    return [
        (name, m) for name, m in model.named_modules() if any(cls.__name__ in MIXER_CLASSES for cls in type(m).__mro__)
    ]


def _unsupported(mixer: nn.Module) -> str | None:
    if any(partitioned_by_zero3(p) for p in mixer.parameters()):
        # ZeRO-3 gathers a weight only where a module reads it; the Function reads the projections' factors and
        # bases directly. transformers' path reads them through the parametrizations, which ZeRO-3 gathers.
        # (Checked first: a partitioned weight's shape reads as (0,).)
        return "DeepSpeed ZeRO-3 partitions its parameters"
    if mixer.activation not in ("silu", "swish"):
        return f"activation {mixer.activation!r} (the kernels apply SiLU)"
    if mixer.conv1d.weight.shape[-1] not in CONV_WIDTHS:
        return f"conv width {mixer.conv1d.weight.shape[-1]} (causal_conv1d takes 2 to 4)"
    if is_quantized(mixer):
        return "a quantized model"
    if has_accelerate_hooks(mixer):
        return "accelerate hooks (offloaded weights)"
    return None


def _plan(mixer: nn.Module) -> str:
    parts = [f"{name}={describe(getattr(mixer, name))}" for name in ("in_proj", "out_proj")]
    parts += [f"{name}={describe_small(getattr(mixer, name), 'weight')}" for name in ("x_proj", "dt_proj")]
    parts.append(f"A_log={describe_small(mixer, 'A_log')}")
    return ", ".join(parts)


def install_fused_path(
    model: nn.Module, kernels: MambaKernels | None = None, log: Callable[[str], Any] = logger.info
) -> str:
    """Route the training forward of every Mamba-1 mixer of ``model`` through :class:`~.inner.MambaInnerFn`.

    Call after the adapters are attached and whenever they change; calling it again is harmless. ``kernels``
    defaults to the CUDA kernels; where they cannot run (no CUDA device, mamba-ssm or causal-conv1d missing, a
    mixer configuration the kernels do not support) the mixers keep transformers' path, and a call with the
    model elsewhere than on the kernels' device goes to transformers' forward. Returns the line it logs through
    ``log``; on a CUDA model that cannot take the path it also warns.
    """
    mixers = mamba1_mixers(model)
    if not mixers:
        return _report(f"fused path: off, {type(model).__name__} has no Mamba-1 mixer", log, warn=False)
    device_type = next(mixers[0][1].parameters()).device.type
    on_cuda = device_type == "cuda"
    reason = ""
    if kernels is None:
        kernels, reason = load_cuda_kernels()
    if kernels is not None:
        reason = "; ".join(f"{name}: {why}" for name, m in mixers if (why := _unsupported(m)))
    if reason:
        uninstall_fused_path(model)
        reasons = sorted({why for _, m in mixers if (why := _unsupported(m))}) if kernels is not None else [reason]
        return _report(f"fused path: off ({'; '.join(reasons)}), mixers run transformers' path", log, warn=on_cuda)
    for _, mixer in mixers:
        mixer.__dict__[KERNELS_ATTRIBUTE] = kernels
        mixer.__dict__["forward"] = types.MethodType(forward, mixer)
    kind = next(cls.__name__ for cls in type(mixers[0][1]).__mro__ if cls.__name__ in MIXER_CLASSES)
    plans = " | ".join(sorted({_plan(m) for _, m in mixers}))
    line = f"fused path: {len(mixers)} {kind}s on sdt.fused.MambaInnerFn ({kernels.name}); {plans}"
    # an adapter this path does not know costs its weight's full gradient, as on transformers' path: say so
    unknown = sorted(
        {
            name
            for _, m in mixers
            for name in ("in_proj", "out_proj")
            if parametrize.is_parametrized(getattr(m, name), "weight") and kind_of(getattr(m, name)) == "weight"
        }
    )
    if unknown:
        line += f" (unrecognised adapters on {', '.join(unknown)} train through their full weight gradient)"
    if kernels.device_type not in (None, device_type):  # the forward checks the device at every call
        line += f" (the model is on {device_type} now: it takes the path once on {kernels.device_type})"
    return _report(line, log, warn=on_cuda and bool(unknown))


def uninstall_fused_path(model: nn.Module) -> None:
    """Give every Mamba-1 mixer its class's forward back (before merging or detaching, or to compare paths)."""
    for _, mixer in mamba1_mixers(model):
        mixer.__dict__.pop("forward", None)
        mixer.__dict__.pop(KERNELS_ATTRIBUTE, None)


def _report(line: str, log: Callable[[str], Any], warn: bool) -> str:
    if warn:
        logger.warning(line)
    if not warn or log != logger.info:  # bound methods compare equal, never identical
        log(f"WARNING: {line}" if warn else line)
    return line
