"""The training forward of a Mamba-2 mixer (transformers' ``Mamba2Mixer`` and the hybrids' mixers) on the fused path.

transformers' training forward hands ``in_proj(h)`` and the effective out_proj weight to mamba-ssm's
``mamba_split_conv1d_scan_combined``. With adapters in weight space that costs, at every step, a copy of each
adapted weight (``W0 + Δ``) and the full gradient of in_proj's and out_proj's weights, which autograd then carries on
to the adapters. Here the two projections run in activation space around the same kernel, called without its
out_proj (:mod:`.projections`): LoRA as ``W0 x + s · B (A x)``, SDT's B/C-row delta as ``Δ x`` added to those rows'
outputs; neither W0 is copied and neither gets a gradient. conv1d, dt_bias, A_log, D and the norm are read through
their parametrizations as transformers reads them.

As on the Mamba-1 path (:mod:`.mixer`), only a training forward that starts from no state is taken over: no cache, or
a cache that holds nothing yet for this layer (``Mamba2ForCausalLM`` builds one in training, since its config says
``use_cache``; transformers then runs its unfused chunked scan), whose conv input and final state it records as
transformers does. Evaluation, generation steps that continue from a state and any call this forward does not
recognise run the class's own forward, unchanged. The padding mask is applied where transformers' kernel path
applies it: to the mixer's input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..compat.transformers import mixer_cache
from .kernels import Mamba2Kernels
from .mixer import record_in_cache, takes_fused_path
from .projections import project_tokens_first, projection

KERNELS_ATTRIBUTE = "_sdt_fused_mamba2_kernels"


def fused_forward(
    mixer: nn.Module,
    kernels: Mamba2Kernels,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Any | None,
) -> torch.Tensor:
    """What transformers' ``Mamba2Mixer`` computes in training from no state, adapters in activation space."""
    batch, length, hidden = hidden_states.shape
    if attention_mask is not None:
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    # Falcon-H1's µP multipliers scale in_proj's input and each block of its output, adapters included, as there
    if (in_multiplier := getattr(mixer, "ssm_in_multiplier", None)) is not None:
        hidden_states = hidden_states * in_multiplier
    zxbcdt = project_tokens_first(hidden_states.reshape(batch * length, hidden), projection(mixer.in_proj))
    zxbcdt = zxbcdt.view(batch, length, -1)
    if (mup_vector := getattr(mixer, "mup_vector", None)) is not None:
        zxbcdt = zxbcdt * mup_vector
    norm_weight = getattr(mixer.norm, "weight", None)  # Falcon-H1 may have no gated norm: the kernel then only gates
    y, final_state = kernels.split_conv1d_scan(
        zxbcdt,
        mixer.conv1d.weight.squeeze(1),
        mixer.conv1d.bias,
        mixer.dt_bias,
        -torch.exp(mixer.A_log.float()),
        mixer.D,
        mixer.chunk_size,
        tuple(mixer.time_step_limit),
        norm_weight,
        None if norm_weight is None else mixer.norm.variance_epsilon,
        mixer.head_dim,
        mixer.n_groups,
        final_state=cache is not None,
    )
    if cache is not None:
        conv_input = zxbcdt[..., mixer.intermediate_size : mixer.intermediate_size + mixer.conv_dim]
        record_in_cache(cache, mixer, conv_input.detach().transpose(1, 2), final_state)
    out = project_tokens_first(y.reshape(batch * length, -1), projection(mixer.out_proj))
    return out.view(batch, length, -1)


def forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Bound to a mixer instance by :func:`sdt.fused.install_fused_path` (see :func:`.mixer.forward` for why)."""
    kernels = self.__dict__[KERNELS_ATTRIBUTE]
    if takes_fused_path(self, kernels, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        return fused_forward(self, kernels, hidden_states, kwargs.get("attention_mask"), mixer_cache(kwargs))
    return type(self).forward(self, *args, **kwargs)
