"""Putting the fused path on a model's Mamba mixers, taking it off, and the one log line that says which runs."""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..compat.deepspeed import partitioned_by_zero3
from ..compat.mamba_ssm import CudaKernels, CudaMamba2Kernels, load_cuda_kernels
from ..compat.transformers import has_accelerate_hooks, is_quantized
from ..parametrize import SparseDeltaView
from ..state import restore_forward, state_adapter
from . import linear, mamba2, mixer
from .kernels import Mamba2Kernels, MambaKernels
from .projections import describe, describe_small, kind_of

logger = logging.getLogger(__name__)

# the CUDA conv kernel's limits (causal_conv1d.cpp); the scans' state limit (256) is above both families' states
CONV_WIDTHS = range(2, 5)


@dataclass(frozen=True)
class Route:
    """How one layout of mixer takes the fused path."""

    classes: tuple[str, ...]  # the mixer classes, matched by name along the MRO: parametrize subclasses them
    kernels_class: type
    kernels_method: str  # one the route's kernels have (the protocols are structural)
    attribute: str  # where a mixer keeps its kernels
    forward: Callable[..., Any]
    function: str  # what the log line says runs
    small_tensors: tuple[tuple[str, str], ...]  # (submodule or "", tensor) for the log line

    def mixers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [
            (name, m)
            for name, m in model.named_modules()
            if any(cls.__name__ in self.classes for cls in type(m).__mro__)
        ]


MAMBA1 = Route(
    ("MambaMixer", "JambaMambaMixer"),
    CudaKernels,
    "scan_fwd",
    mixer.KERNELS_ATTRIBUTE,
    mixer.forward,
    "sdt.fused.MambaInnerFn",
    (("x_proj", "weight"), ("dt_proj", "weight"), ("", "A_log")),
)
MAMBA2 = Route(
    # Mamba-2 and the hybrids' Mamba-2 mixers (Bamba, Granite-4.0-H, Nemotron-H, Falcon-H1, Zamba2)
    (
        "Mamba2Mixer",
        "BambaMixer",
        "GraniteMoeHybridMambaLayer",
        "NemotronHMamba2Mixer",
        "FalconH1Mixer",
        "Zamba2MambaMixer",
    ),
    CudaMamba2Kernels,
    "split_conv1d_scan",
    mamba2.KERNELS_ATTRIBUTE,
    mamba2.forward,
    "sdt.fused.mamba2",
    (("conv1d", "weight"), ("", "A_log")),
)
ROUTES = (MAMBA1, MAMBA2)


def mamba1_mixers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Mamba-1 mixers (Mamba's, Jamba's mamba layers)."""
    return MAMBA1.mixers(model)


def mamba2_mixers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return MAMBA2.mixers(model)


def _route(model: nn.Module) -> tuple[Route | None, list[tuple[str, nn.Module]]]:
    for route in ROUTES:
        if found := route.mixers(model):
            return route, found
    return None, []


def _unsupported(mixer: nn.Module) -> str | None:
    if any(partitioned_by_zero3(p) for p in mixer.parameters()):
        # ZeRO-3 gathers a weight only where a module reads it; the Function reads the projections' factors and
        # bases directly. transformers' path reads them through the parametrizations, which ZeRO-3 gathers.
        # (Checked first: a partitioned weight's shape reads as (0,).)
        return "DeepSpeed ZeRO-3 partitions its parameters"
    if mixer.activation not in ("silu", "swish"):
        return f"activation {mixer.activation!r} (the kernels apply SiLU)"
    if getattr(getattr(mixer, "norm", None), "norm_before_gate", False):  # Falcon-H1's, with its gated norm on
        return "a gated norm that normalises before the gate (the kernel gates first)"
    if mixer.conv1d.weight.shape[-1] not in CONV_WIDTHS:
        return f"conv width {mixer.conv1d.weight.shape[-1]} (causal_conv1d takes 2 to 4)"
    if is_quantized(mixer):
        return "a quantized model"
    if has_accelerate_hooks(mixer):
        return "accelerate hooks (offloaded weights)"
    return None


def _plan(route: Route, mixer: nn.Module) -> str:
    parts = [f"{name}={describe(getattr(mixer, name))}" for name in ("in_proj", "out_proj")]
    for module, tensor in route.small_tensors:
        owner = getattr(mixer, module) if module else mixer
        parts.append(f"{module or tensor}={describe_small(owner, tensor)}")
    if (state := state_adapter(mixer)) is not None:
        parts.append(f"state {state.kind} (sdt.state)")
    return ", ".join(parts)


def install_fused_path(
    model: nn.Module, kernels: MambaKernels | Mamba2Kernels | None = None, log: Callable[[str], Any] = logger.info
) -> str:
    """Route the training forward of every Mamba mixer of ``model`` through the fused path: Mamba-1 mixers through
    :class:`~.inner.MambaInnerFn`, Mamba-2 mixers through :mod:`.mamba2`.

    Call after the adapters are attached and whenever they change; calling it again is harmless. ``kernels``
    defaults to the CUDA kernels of the model's mixers; where they cannot run (no CUDA device, mamba-ssm or
    causal-conv1d missing, a mixer configuration the kernels do not support) the mixers keep transformers' path,
    and a call with the model elsewhere than on the kernels' device goes to transformers' forward. Returns the line
    it logs through ``log``; on a CUDA model that cannot take the path it also warns.
    """
    route, mixers = _route(model)
    if route is None:
        return _report(f"fused path: off, {type(model).__name__} has no Mamba mixer", log, warn=False)
    device_type = next(mixers[0][1].parameters()).device.type
    on_cuda = device_type == "cuda"
    reason = ""
    if kernels is None:
        kernels, reason = load_cuda_kernels(route.kernels_class)
    elif not hasattr(kernels, route.kernels_method):
        raise TypeError(f"kernels: {kernels.name} cannot run {route.classes[0]}s (they have no {route.kernels_method})")
    if kernels is not None:
        reason = "; ".join(f"{name}: {why}" for name, m in mixers if (why := _unsupported(m)))
    if reason:
        uninstall_fused_path(model)
        reasons = sorted({why for _, m in mixers if (why := _unsupported(m))}) if kernels is not None else [reason]
        path = "sdt.state's PyTorch forward" if state_adapter(mixers[0][1]) else "transformers' path"
        return _report(f"fused path: off ({'; '.join(reasons)}), mixers run {path}", log, warn=on_cuda)
    for _, m in mixers:
        m.__dict__[route.attribute] = kernels
        m.__dict__["forward"] = types.MethodType(route.forward, m)
    if route is MAMBA2:  # packed rows: the model's seq_idx reaches the mixers whatever transformers passes on
        mamba2.hand_seq_idx_to_mixers(model, [m for _, m in mixers])
    _set_sparse_refresh(mixers, in_training=False)
    kind = next(cls.__name__ for cls in type(mixers[0][1]).__mro__ if cls.__name__ in route.classes)
    plans = " | ".join(sorted({_plan(route, m) for _, m in mixers}))
    line = f"fused path: {len(mixers)} {kind}s on {route.function} ({kernels.name}); {plans}"
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
    line += _linear_part(*linear.install(model, skip=[m for _, m in mixers]))
    if kernels.device_type not in (None, device_type):  # the forward checks the device at every call
        line += f" (the model is on {device_type} now: it takes the path once on {kernels.device_type})"
    return _report(line, log, warn=on_cuda and bool(unknown))


def _linear_part(taken: int, kept: list[str]) -> str:
    """The log line's part on the Linear layers beside the mixers (attention, MLP) that carry LoRA."""
    if not taken and not kept:
        return ""
    part = f"; LoRA in activation space on {taken} Linear layers beside the mixers"
    if kept:
        classes = ", ".join(sorted(set(kept)))
        part += f" ({len(kept)} more keep weight space, with its full weight gradient: {classes})"
    return part


def uninstall_fused_path(model: nn.Module) -> None:
    """Give every Mamba mixer, and every Linear beside them with LoRA in activation space, its class's forward back
    (before merging or detaching, or to compare paths)."""
    linear.uninstall(model)
    route, mixers = _route(model)
    for _, m in mixers:
        restore_forward(m)  # its class's, or sdt.state's for a mixer with a state adapter
        m.__dict__.pop(route.attribute, None)
    if route is MAMBA2:
        mamba2.stop_handing_seq_idx(model, [m for _, m in mixers])
    _set_sparse_refresh(mixers, in_training=True)


def _set_sparse_refresh(mixers: list[tuple[str, nn.Module]], in_training: bool) -> None:
    """Whether the sparse groups on the mixers' projections form ``W0 + Δ`` before a training forward: not while the
    fused path applies their deltas in activation space (:meth:`~sdt.parametrize.SparseDeltaGroup.dense_delta`)."""
    for _, m in mixers:
        for name in ("in_proj", "out_proj"):
            linear = getattr(m, name)
            if parametrize.is_parametrized(linear, "weight"):
                for adapter in linear.parametrizations.weight:
                    if type(adapter) is SparseDeltaView and adapter.group.rows is not None:
                        adapter.group.refresh_in_training = in_training


def _report(line: str, log: Callable[[str], Any], warn: bool) -> str:
    if warn:
        logger.warning(line)
    if not warn or log != logger.info:  # bound methods compare equal, never identical
        log(f"WARNING: {line}" if warn else line)
    return line
