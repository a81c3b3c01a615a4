"""Weight-space adapters, registered with ``torch.nn.utils.parametrize``.

Each adapter maps the frozen base tensor W0 to an effective tensor. Because the effective tensor is what
``module.weight`` (or ``mixer.A_log``) returns, code that reads weights directly, such as the fused mamba-ssm
kernels, sees the adapter; a forward-wrapping adapter would be skipped there silently.

Adapter parameters are fp32 whatever the base dtype: the sum W0 + Δ is formed in fp32 on the touched entries
and only then cast to the compute dtype, so small updates accumulate in the adapter instead of vanishing.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


class LowRankDelta(nn.Module):
    """LoRA in weight space: W0 + (alpha / rank) · B @ A, with A kaiming-uniform and B zero (PEFT's init).

    Dropout on the LoRA input cannot exist in weight space; the official p=0.1 is therefore dropped.
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        lora_a = torch.empty(rank, in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(lora_a.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=weight.device))
        self.scaling = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scaling * (self.lora_B @ self.lora_A)).to(weight.dtype)


class SparseDelta(nn.Module):
    """SDT's training-phase adapter: W0 plus a trainable value at each of a fixed set of entries.

    ``index`` holds flat (row-major) positions into W0; it is a buffer so it follows ``.to()`` and lands in the
    state dict. Only the gathered entries are promoted to fp32, so the cost does not grow with the tensor.
    """

    def __init__(self, weight: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(device=weight.device, dtype=torch.long, copy=True))
        self.delta = nn.Parameter(torch.zeros(index.numel(), dtype=torch.float32, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(-1)
        values = (flat[self.index].float() + self.delta).to(weight.dtype)
        return flat.index_put((self.index,), values).view_as(weight)


class DenseDelta(nn.Module):
    """SDT's warmup adapter: a dense fp32 delta over the whole tensor or over the rows ``[start, stop)``."""

    def __init__(self, weight: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.rows = rows
        shape = weight.shape if rows is None else (rows[1] - rows[0], *weight.shape[1:])
        self.delta = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return (weight.float() + self.delta).to(weight.dtype)
        start, stop = self.rows
        block = (weight[start:stop].float() + self.delta).to(weight.dtype)
        return torch.cat([weight[:start], block, weight[stop:]])


ADAPTER_TYPES = (LowRankDelta, SparseDelta, DenseDelta)


def attach(module: nn.Module, name: str, adapter: nn.Module) -> None:
    """Freeze ``module.<name>`` and route every read of it through ``adapter``."""
    if not parametrize.is_parametrized(module, name):
        getattr(module, name).requires_grad_(False)
    parametrize.register_parametrization(module, name, adapter)


def detach_all(model: nn.Module, *, merge: bool) -> None:
    """Remove every parametrization; ``merge`` bakes the effective tensors in, otherwise W0 comes back as it was."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, name, leave_parametrized=merge)


def adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every adapter in ``model`` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]
