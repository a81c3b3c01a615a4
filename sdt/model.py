"""The SDT lifecycle on a Hugging Face SSM model: apply -> warmup -> select -> restart -> train -> merge.

The adapters live inside the model (as parametrizations), so the model stays a plain ``nn.Module`` that any
trainer, DDP or DeepSpeed can take; the :class:`Tuner` only drives the phases.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from . import parametrize as P
from . import state as S
from .config import SDTConfig
from .fused import install_fused_path, uninstall_fused_path
from .saving import save_into
from .targets import Selection, check_counts, check_lora_targets, family_of, for_model, layer_lora_plan, mixers
from .variants import get_variant

Phase = Literal["warmup", "train"]


class AdapterCoverageError(RuntimeError):
    """Some adapter tensor got no gradient: a kernel read the weight without going through the adapter."""


def to_compute_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the model to ``dtype`` but keep every mixer's A_log and D in fp32, as mamba-ssm does (docs/method.md §5).

    Call it on an fp32 model before :func:`apply`: casting A_log to bf16 and back would already lose digits.
    """
    keep = {id(t) for _, m in mixers(model) for t in (m.A_log, m.D)}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and id(tensor) not in keep:
            tensor.data = tensor.data.to(dtype)
    return model


class Tuner:
    """Attaches SDT / LoRA adapters to ``model`` and walks it through the phases of ``config.method``.

    * ``sdlora`` / ``sdt`` start in ``warmup``: a dense fp32 delta on A_log (and, for Mamba-2, on the B/C rows of
      in_proj) trains, with the LoRA adapters, for ``config.warmup_steps`` optimizer steps. Then
      :meth:`select` ranks channels and states per layer and :meth:`start_training` restores the base weights,
      drops every warmup adapter and attaches fresh LoRA plus sparse deltas at the selected entries.
      Build a new optimizer and schedule after it: nothing of warmup's optimizer state may carry over.
    * ``lora`` and ``full`` start in ``train``.

    Passing ``selection`` starts directly in ``train`` with that selection (loading an adapter, resuming).

    On CUDA with mamba-ssm, Mamba-1 and Mamba-2 mixers train through :mod:`sdt.fused` (only the gradients the
    adapters need); :attr:`kernel_path` is the line that says which path runs.

    While adapters are attached, ``model.save_pretrained`` is :meth:`save_pretrained`: it writes the adapter,
    as a PEFT model does, so ``Trainer.save_model`` and Trainer checkpoints hold adapters that :func:`sdt.load`
    reads. :meth:`merge` gives the model its class's ``save_pretrained`` back.
    """

    def __init__(self, model: nn.Module, config: SDTConfig, selection: dict[str, Selection] | None = None) -> None:
        self.model = model
        self.config = for_model(model, config)
        self.family = family_of(model)
        self.mixers = mixers(model)
        self.selection: dict[str, Selection] | None = None
        self.merged = False
        if config.trains_all_weights:
            model.requires_grad_(True)
            self.phase: Phase = "train"
        elif selection is not None or not config.uses_sdt:
            model.requires_grad_(False)
            self._attach_training_adapters(selection)
        else:
            model.requires_grad_(False)
            self.phase = "warmup"
            self._attach_lora(seed=config.seed)
            for _, mixer in self.mixers:
                for spec in self.family.warmup_specs(mixer):
                    weight = getattr(spec.module, spec.tensor)
                    P.attach(spec.module, spec.tensor, P.DenseDelta(weight, spec.rows))
        self.kernel_path = install_fused_path(model)
        if not config.trains_all_weights and hasattr(model, "save_pretrained"):  # full: a plain model saves plainly
            # an instance attribute: parametrize's class swaps keep it, and copy.deepcopy rebinds it to the copy
            model.__dict__["save_pretrained"] = self.save_pretrained

    # -- phases ---------------------------------------------------------------------------------------------

    def warmup_updates(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per mixer, the dense updates that warmup made (key -> tensor, detached fp32 copies)."""
        self._require_phase("warmup")
        updates = {}
        for prefix, mixer in self.mixers:
            updates[prefix] = {}
            for spec in self.family.warmup_specs(mixer):
                # Found by type: a LoRA on the same tensor (Mamba-2's in_proj) may sit before it in the chain.
                (dense,) = [p for p in spec.module.parametrizations[spec.tensor] if isinstance(p, P.DenseDelta)]
                updates[prefix][spec.key] = dense.delta.detach().clone()
        return updates

    def select(self, updates: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Selection]:
        """Rank channels and states per layer from the warmup updates (this model's own, or ones given)."""
        return select(self.model, self.config, self.warmup_updates() if updates is None else updates)

    def start_training(self, selection: dict[str, Selection]) -> None:
        """Restore the base weights exactly, drop warmup's adapters, attach fresh LoRA + sparse deltas."""
        self._require_phase("warmup")
        P.detach_all(self.model, merge=False)
        self._attach_training_adapters(selection)
        self.kernel_path = install_fused_path(self.model)  # the projections' treatment changed with the adapters

    def _attach_training_adapters(self, selection: dict[str, Selection] | None) -> None:
        self.phase = "train"
        if self.config.uses_sdt:
            if selection is None or set(selection) != {prefix for prefix, _ in self.mixers}:
                raise ValueError("selection: needs one entry per mixer of the model")
            device = next(self.model.parameters()).device
            self.selection = {p: {k: v.to(device) for k, v in s.items()} for p, s in selection.items()}
            groups: dict[str, list] = {}
            for prefix, mixer in self.mixers:
                for spec in self.family.sparse_specs(mixer, self.selection[prefix], self.config.sdt_targets):
                    member = (spec.module, spec.tensor, spec.index, f"{prefix}.{spec.path}", spec.rows)
                    groups.setdefault(spec.path.replace(".", "_"), []).append(member)
            P.attach_sparse_groups(self.model, groups)  # first: sparse views read the stacked base tensors
        # A different seed from warmup's: the official code re-initialises LoRA for the real run.
        self._attach_lora(seed=self.config.seed + 1)
        if self.config.state:
            for _, mixer in self.mixers:
                S.attach(mixer, self.config.state)

    def _attach_lora(self, seed: int) -> None:
        cfg = self.config
        check_lora_targets(self.family, cfg)
        variant = get_variant(cfg.lora_variant)
        generator = torch.Generator().manual_seed(seed)
        tensors = [(getattr(mixer, target), "weight") for _, mixer in self.mixers for target in cfg.lora_targets]
        tensors += [
            t for kind in layer_lora_plan(self.model, cfg) for _, layer in kind.layers for t in kind.tensors(layer)
        ]
        # A weight shared by several modules (Zamba2's shared transformer block, tied at every depth it serves) gets
        # one adapter, attached at each: every depth sees the same update, and merging bakes it in once.
        built: dict[int, nn.Module] = {}
        for module, name in tensors:
            weight = P.original(module, name)
            if id(weight) not in built:
                built[id(weight)] = variant.build(weight, cfg.lora_rank, cfg.lora_alpha, generator)
            P.attach(module, name, built[id(weight)])

    def engine_wrapped(self) -> str:
        """Call after wrapping the model in a training engine that adds hooks or partitions parameters
        (DeepSpeed): sdt's own forward hook moves after the engine's, and the fused path is checked again (it
        stands aside for ZeRO-3's partitioned parameters). Returns the kernel path line."""
        P.move_hooks_last(self.model)
        self.kernel_path = install_fused_path(self.model)
        return self.kernel_path

    def _require_phase(self, phase: Phase) -> None:
        if self.merged or self.phase != phase:
            raise RuntimeError(f"only possible in the {phase} phase; the tuner is in {self.state_name}")

    @property
    def state_name(self) -> str:
        return "merged" if self.merged else self.phase

    # -- parameters and checks ------------------------------------------------------------------------------

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of what trains: adapter tensors only (a method that trains all weights: every weight)."""
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets, as torch's ``parameters()`` gives it."""
        return [p for _, p in self.named_trainable_parameters()]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def check_gradients(self, grad_of: Callable[[nn.Parameter], torch.Tensor | None] | None = None) -> None:
        """Coverage guard: call after the first backward; raises naming every adapter tensor with no gradient.

        ``grad_of`` reads a parameter's gradient (default ``p.grad``; under DeepSpeed ZeRO pass
        ``deepspeed.utils.safe_get_full_grad``). A LoRA ``lora_A`` may have an all-zero gradient while its
        ``lora_B`` is still all zero, as at the first step (B = 0 by init), but it must not be missing.
        """
        grad_of = grad_of or (lambda p: p.grad)
        names = {id(p): name for name, p in self.named_trainable_parameters()}
        problems = []
        for _, adapter in P.adapters(self.model):
            for param_name, param in adapter.named_parameters(recurse=False):
                grad = grad_of(param)
                name = names.get(id(param), param_name)
                if isinstance(adapter, P.SparseDeltaGroup):
                    # one tensor for all layers: each layer's segment must get its own gradient
                    segments = [None] * len(adapter.names) if grad is None else grad.split(adapter.sizes)
                    parts = [(f"{layer} (sparse delta in {name})", g) for layer, g in zip(adapter.names, segments)]
                else:
                    parts = [(name, grad)]
                for part_name, part in parts:
                    if part is None:
                        problems.append(f"{part_name}: no gradient")
                    elif not torch.count_nonzero(part):
                        # dL/dA = B^T(...) vanishes while B is still all zero, as at the first step (B = 0 by init).
                        lora_b = getattr(adapter, "lora_B", None)
                        excused = (
                            param_name == "lora_A" and lora_b is not None and not torch.count_nonzero(lora_b.detach())
                        )
                        if not excused:
                            problems.append(f"{part_name}: all-zero gradient")
        if self.config.trains_all_weights:
            problems += [f"{name}: no gradient" for name, p in self.named_trainable_parameters() if grad_of(p) is None]
        if problems:
            raise AdapterCoverageError(
                f"{len(problems)} adapter tensor(s) got no gradient: {', '.join(problems)}. A kernel probably reads "
                "these weights directly, bypassing the adapter; training them would silently do nothing."
            )

    # -- saving and the end ------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """``model.save_pretrained`` while the adapters are attached: the adapter (what :func:`sdt.save` writes)
        written into ``save_directory``, next to what a Trainer puts there.

        A full save of the parametrized model would hold keys that a plain ``from_pretrained`` does not know: it
        would re-initialise A_log and the adapted weights at random. The adapter's ``config.json`` marker makes
        ``from_pretrained`` stop instead, naming :func:`sdt.load`. ``state_dict`` (DeepSpeed's gathered copy of the
        same weights) and the options of a full save (sharding, serialization) do not apply to an adapter and are
        ignored. For a plain model use :func:`sdt.save_merged`.
        """
        if push_to_hub:
            raise NotImplementedError("push_to_hub with an adapter: save_pretrained, then upload the directory")
        if is_main_process:
            save_into(self, save_directory)

    def merge(self) -> nn.Module:
        """Bake the adapters into plain weights and return the (now adapter-free) model."""
        if self.phase != "train":
            raise RuntimeError("merge: only a training-phase adapter can be merged, not a warmup one")
        S.refuse_merge(self.config.method, self.config.state)
        uninstall_fused_path(self.model)  # a merged model is a plain transformers model
        self.model.__dict__.pop("save_pretrained", None)
        P.detach_all(self.model, merge=True)
        self.merged = True
        return self.model


def select(model: nn.Module, config: SDTConfig, updates: dict[str, dict[str, torch.Tensor]]) -> dict[str, Selection]:
    """Rank channels and states per layer of ``model`` from warmup updates (only the model's shapes are read, so
    a fresh copy of the base will do: ``Tuner(fresh_base, config, selection=select(fresh_base, config, updates))``
    starts its training phase as :meth:`Tuner.start_training` would)."""
    family = family_of(model)
    return {prefix: family.select(prefix, mixer, updates[prefix], config) for prefix, mixer in mixers(model)}


def apply(model: nn.Module, config: SDTConfig | None = None) -> Tuner:
    """Attach the adapters of ``config`` (default: the ``sdlora`` preset) to ``model``. A ratio that would select
    nothing in some layer fails here (:class:`~sdt.SDTConfigError`), not after the warmup, and so does a model sdt
    cannot tune (:class:`~sdt.UnsupportedModelError`)."""
    config = config or SDTConfig()
    check_counts(model, config)
    return Tuner(model, config)
