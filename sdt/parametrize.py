"""Weight-space adapters, registered with ``torch.nn.utils.parametrize``.

Each adapter maps the frozen base tensor W0 to an effective tensor. Because the effective tensor is what
``module.weight`` (or ``mixer.A_log``) returns, code that reads weights directly, such as the fused mamba-ssm
kernels, sees the adapter; a forward-wrapping adapter would be skipped there silently.

Adapter parameters are fp32 whatever the base dtype: the sum W0 + Δ is formed in fp32 on the touched entries
and only then cast to the compute dtype, so small updates accumulate in the adapter instead of vanishing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize


class Adapter(nn.Module):
    """Base of every weight-space adapter: what :func:`adapters` finds, saves and checks for gradients."""


def low_rank_factors(weight: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA's (A, B) for ``weight`` (out, in), fp32, as PEFT initialises them: A kaiming-uniform, B zero. A stacked
    weight (experts, out, in), as a MoE keeps its experts', gets one pair per expert: A (experts, rank, in)."""
    *stack, out_features, in_features = weight.shape
    lora_a = torch.empty(math.prod(stack) * rank, in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)  # fan-in: in_features, per expert too
    lora_b = torch.zeros(*stack, out_features, rank, dtype=torch.float32, device=weight.device)
    return nn.Parameter(lora_a.view(*stack, rank, in_features).to(weight.device)), nn.Parameter(lora_b)


class LowRankDelta(Adapter):
    """LoRA in weight space: W0 + scaling · B @ A, with A kaiming-uniform and B zero (PEFT's init); on a stacked
    (experts, out, in) weight, one B @ A per expert.

    Dropout on the LoRA input cannot exist in weight space; the official p=0.1 is therefore dropped.
    """

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float, generator: torch.Generator) -> None:
        super().__init__()
        self.lora_A, self.lora_B = low_rank_factors(weight, rank, generator)
        self.scaling = scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scaling * (self.lora_B @ self.lora_A)).to(weight.dtype)


class SparseDeltaGroup(Adapter):
    """SDT's training-phase adapter for one kind of tensor across all layers (e.g. every mixer's A_log).

    Holds one fp32 delta per selected entry and writes all layers' entries with a single gather-add-scatter into
    the stacked base tensors. Doing that per layer costs about a dozen small kernels and Python dispatches per
    layer and step, which shows where a step is bound by launch overhead, as a mamba-130m step is (SDLoRA's step
    against LoRA's: docs/benchmarks.md).

    The stacked result is computed once per forward of the model, *before* its first layer runs (the model's
    forward pre-hook, see :func:`attach_sparse_groups`), and every read of a layer's tensor until the delta changes
    returns its slice. Computing it up front, outside every layer, is what makes gradient checkpointing work: a
    recomputed layer reads the same tensor as its original forward did, so both record the same graph. A read
    after an in-place update of the delta (the optimizer's step) computes a fresh result.

    ``index`` holds flat (row-major) positions into the stacked tensors; it is a buffer, so it follows ``.to()``
    and lands in the state dict. ``base`` is a non-persistent copy of the frozen base tensors.
    """

    def __init__(
        self,
        weights: list[torch.Tensor],
        indices: list[torch.Tensor],
        names: list[str],
        rows: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.rows = rows
        # Only the rows that can change are stacked: Mamba-2's B/C rows are a sliver of its in_proj, and a copy of
        # every layer's whole in_proj would double that weight's memory.
        blocks = [w.detach() if rows is None else w.detach()[rows[0] : rows[1]] for w in weights]
        base = torch.stack(blocks)
        self.register_buffer("base", base, persistent=False)
        numel, block_numel = weights[0].numel(), blocks[0].numel()
        skipped = 0 if rows is None else rows[0] * weights[0].shape[1]
        # ``index`` (saved with the adapter): positions in the stacked whole tensors; ``block_index``: the same
        # entries in the stacked blocks, where the scatter writes.
        index = [i.to(device=base.device, dtype=torch.long) for i in indices]
        self.register_buffer("index", torch.cat([i + layer * numel for layer, i in enumerate(index)]))
        block_index = [i - skipped + layer * block_numel for layer, i in enumerate(index)]
        self.register_buffer("block_index", torch.cat(block_index), persistent=False)
        self.delta = nn.Parameter(torch.zeros(self.index.numel(), dtype=torch.float32, device=base.device))
        self.names = names
        self.sizes = [i.numel() for i in indices]
        #: False while the fused path reads the deltas itself in training (:meth:`dense_deltas`): the forward
        #: pre-hook then skips the scatter into the base blocks, which nothing would read
        self.refresh_in_training = True
        self._shared: tuple[torch.Tensor, ...] | None = None
        self._shared_key: tuple | None = None

    def _key(self) -> tuple:
        # Changes when the optimizer steps (in-place update), when the tensors move to another device, and
        # between grad modes. Not the storage address: DeepSpeed ZeRO-3 regathers the delta into new storage at
        # every read, and a recomputed checkpointed layer must still see the result of its forward.
        return (self.delta._version, self.delta.device, self.base.device, torch.is_grad_enabled())

    def effective(self) -> tuple[torch.Tensor, ...]:
        """The effective tensor of every layer: the shared result while it is current, else a fresh one."""
        if self._shared is not None and self._shared_key == self._key():
            return self._shared
        return self._compute()

    def refresh(self) -> None:
        """Compute the result that the reads of the coming forward share."""
        self._shared, self._shared_key = self._compute(), self._key()

    def __getstate__(self) -> dict[str, Any]:
        # The shared result is a graph output; a copy (deepcopy, pickle) computes its own on its first read.
        return {**super().__getstate__(), "_shared": None, "_shared_key": None}

    def _compute(self) -> tuple[torch.Tensor, ...]:
        # ``unbind`` rather than one slice per layer: its backward is a single stack of the layers' gradients
        # instead of a zero-filled full-size gradient per layer.
        return _ScatterDelta.apply(self.base, self.block_index, self.delta).unbind(0)

    def dense_delta(self, position: int) -> torch.Tensor:
        """Layer ``position``'s delta as a dense fp32 block of the base's shape (zero off its selected entries), for
        a path that applies it in activation space (``x Δᵀ`` beside ``x W0ᵀ``) instead of forming ``W0 + Δ``."""
        start = sum(self.sizes[:position])
        entries = slice(start, start + self.sizes[position])
        block_numel = self.base[0].numel()
        local = self.block_index[entries] - position * block_numel
        return self.delta.new_zeros(block_numel).index_put((local,), self.delta[entries]).view(self.base.shape[1:])


class _ScatterDelta(torch.autograd.Function):
    """``base`` with ``base[index] + delta`` written at the flat positions ``index`` (the sum formed in fp32).

    Its backward keeps nothing that autograd frees, so it can run once per reader: reentrant gradient
    checkpointing back-propagates each recomputed layer through the shared result on its own.
    """

    @staticmethod
    def forward(ctx, base: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        flat = base.reshape(-1)
        ctx.index = index  # an attribute, not save_for_backward: it must outlive a first backward
        return flat.index_put((index,), (flat[index].float() + delta).to(flat.dtype)).view_as(base)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        return None, None, grad.reshape(-1)[ctx.index].float()


class SparseDeltaView(nn.Module):
    """Parametrization of one layer's tensor: its slice of a :class:`SparseDeltaGroup`."""

    def __init__(self, group: SparseDeltaGroup, position: int) -> None:
        super().__init__()
        self.position = position
        # A reference, not a submodule: the group is registered once, on the model.
        self.__dict__["group"] = group

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        block = self.group.effective()[self.position]
        if self.group.rows is None:
            return block
        start, stop = self.group.rows
        return torch.cat([weight[:start], block, weight[stop:]])


class DenseDelta(Adapter):
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


SPARSE_GROUPS = "sdt_sparse"  # where the sparse groups hang on the model


class SparseGroups(nn.ModuleDict):
    """The model's sparse-delta groups, by tensor kind. Its :meth:`refresh` is the model's forward pre-hook, a
    bound method rather than a closure, so that ``copy.deepcopy(model)`` gives the copy hooks on its own groups."""

    def refresh(self, module: nn.Module, args: Any) -> None:
        for group in self.values():
            if group.refresh_in_training or not module.training:
                group.refresh()


SparseMember = tuple[nn.Module, str, torch.Tensor, str, tuple[int, int] | None]


def attach_sparse_groups(model: nn.Module, groups: dict[str, list[SparseMember]]) -> None:
    """Attach one :class:`SparseDeltaGroup` per kind: ``{kind: [(module, tensor name, flat index, name, rows), ...]}``
    (``rows``: the row range ``[start, stop)`` that holds every entry of the index, or None; one per kind).

    Must come before any other adapter on the same tensors: a view returns the group's result, which is built
    from the stacked base tensors, not from its input.
    """
    container = SparseGroups()
    for kind, members in groups.items():
        for module, tensor, *_ in members:
            if parametrize.is_parametrized(module, tensor):
                raise RuntimeError(f"sparse deltas must be the first adapter on {tensor}")
        group = SparseDeltaGroup(
            [getattr(module, tensor) for module, tensor, *_ in members],
            [index for _, _, index, _, _ in members],
            [name for _, _, _, name, _ in members],
            rows=members[0][4],
        )
        container[kind] = group
        for position, (module, tensor, *_) in enumerate(members):
            attach(module, tensor, SparseDeltaView(group, position))
    model.add_module(SPARSE_GROUPS, container)
    # One scatter per forward of the model, not one per read, computed before any layer runs.
    model.register_forward_pre_hook(container.refresh)


def move_hooks_last(model: nn.Module) -> None:
    """Run the sparse groups' forward pre-hook after every hook added to ``model`` since: DeepSpeed ZeRO-3 gathers
    partitioned parameters (the deltas among them) only once its own forward pre-hook has run."""
    if hasattr(model, SPARSE_GROUPS):
        container = getattr(model, SPARSE_GROUPS)
        _remove_hooks(model, container)
        model.register_forward_pre_hook(container.refresh)


def _remove_hooks(model: nn.Module, container: SparseGroups) -> None:
    # No RemovableHandle is kept: a deep copy of one would still point at the original model's hooks.
    hooks = model._forward_pre_hooks
    for key in [key for key, hook in hooks.items() if getattr(hook, "__self__", None) is container]:
        del hooks[key]


def attach(module: nn.Module, name: str, adapter: nn.Module) -> None:
    """Freeze ``module.<name>`` and route every read of it through ``adapter``."""
    if not parametrize.is_parametrized(module, name):
        getattr(module, name).requires_grad_(False)
    parametrize.register_parametrization(module, name, adapter)


def detach_all(model: nn.Module, *, merge: bool) -> None:
    """Remove every parametrization; ``merge`` bakes the effective tensors in, otherwise W0 comes back as it was."""
    with torch.no_grad():
        if merge and hasattr(model, SPARSE_GROUPS):
            # From the deltas as they are now: an optimizer may have written them behind autograd's back (.data).
            getattr(model, SPARSE_GROUPS).refresh(model, ())
        # A tensor shared by several modules (tied weights) is merged in place once; the other modules then get it
        # back as it is, already merged, rather than having their adapters added a second time.
        merged: set[int] = set()
        for module in list(model.modules()):
            if parametrize.is_parametrized(module):
                for name in list(module.parametrizations.keys()):
                    tensor = id(original(module, name))
                    bake = merge and tensor not in merged
                    parametrize.remove_parametrizations(module, name, leave_parametrized=bake)
                    merged.add(tensor)
    if hasattr(model, SPARSE_GROUPS):
        _remove_hooks(model, getattr(model, SPARSE_GROUPS))
        delattr(model, SPARSE_GROUPS)


def original(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` as stored, under whatever adapters route its reads."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def adapters(model: nn.Module) -> list[tuple[str, Adapter]]:
    """Every adapter in ``model`` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Adapter)]
