"""LoRA on the Linear layers beside the Mamba mixers in activation space (sdt.fused.linear), CPU, fp32.

One Linear: the activation-space forward against the weight-space parametrized forward, output and the factors'
gradients, W0 without one. A tiny Granite-4.0-H through sdt.apply and the fused path on the reference kernels: which
Linear layers take the path, what keeps weight space, evaluation and removal giving the class's forward back, and the
state dict untouched.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import HYBRID_CONFIGS
from fused_reference import ReferenceMamba2Kernels
from test_fused_mamba import loss_and_grads
from test_fused_mamba2 import TOLERANCE, assert_close, fresh_batch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM

import sdt
from sdt import parametrize as P
from sdt.fused import install_fused_path, mamba2_mixers, uninstall_fused_path
from sdt.fused.linear import activation_lora, lora_linear

# fp32 sums of a few dozen products in another order (x(W0 + sBA)ᵀ against xW0ᵀ + s(xAᵀ)Bᵀ): a few ulps of the
# result's scale, far below a wrong factor, scaling or transpose (errors of order 1)
LINEAR_TOLERANCE = 1e-5


def lora_layer(bias: bool, seed: int = 0) -> tuple[nn.Linear, P.LowRankDelta]:
    """A Linear (12 -> 10) with a rank-3 LowRankDelta whose B is nonzero (zero would hide A's gradient)."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(12, 10, bias=bias)
    adapter = P.LowRankDelta(linear.weight, rank=3, scaling=0.7, generator=generator)
    with torch.no_grad():
        adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator))
    P.attach(linear, "weight", adapter)
    return linear, adapter


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("bias", [True, False])
def test_activation_space_matches_the_parametrized_forward_and_gradients(bias):
    linear, adapter = lora_layer(bias)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(2))

    reference = linear(x)  # weight space: F.linear(x, W0 + s·B·A, b)
    (reference * upstream).sum().backward()
    grads_ref = (adapter.lora_A.grad.clone(), adapter.lora_B.grad.clone())
    adapter.zero_grad(set_to_none=True)

    base = linear.parametrizations.weight.original
    assert activation_lora(linear) is adapter
    out = lora_linear(x, base, linear.bias, adapter)
    (out * upstream).sum().backward()

    assert relative_error(out, reference) <= LINEAR_TOLERANCE
    assert relative_error(adapter.lora_A.grad, grads_ref[0]) <= LINEAR_TOLERANCE
    assert relative_error(adapter.lora_B.grad, grads_ref[1]) <= LINEAR_TOLERANCE
    assert base.grad is None


class ScaledLowRank(P.LowRankDelta):
    """A LoRA variant: a subclass may change what the delta is, so the activation path must not take it."""


def test_only_exactly_one_low_rank_delta_on_a_plain_linear_takes_the_activation_path():
    linear, _ = lora_layer(bias=True)
    assert activation_lora(linear) is not None

    two, _ = lora_layer(bias=True)
    P.attach(two, "weight", P.DenseDelta(P.original(two, "weight")))  # a chain of two adapters
    subclassed = nn.Linear(12, 10)
    P.attach(subclassed, "weight", ScaledLowRank(subclassed.weight, 3, 0.7, torch.Generator().manual_seed(0)))

    class OwnLinear(nn.Linear):
        pass

    own = OwnLinear(12, 10)
    P.attach(own, "weight", P.LowRankDelta(own.weight, 3, 0.7, torch.Generator().manual_seed(0)))
    trained_base, _ = lora_layer(bias=True)
    trained_base.parametrizations.weight.original.requires_grad_(True)  # W0 trains: its gradient is wanted

    for layer in (two, subclassed, own, trained_base, nn.Linear(12, 10)):
        assert activation_lora(layer) is None


GRANITE = HYBRID_CONFIGS["granitemoehybrid"]


def granite_tuner(config: sdt.SDTConfig) -> sdt.Tuner:
    torch.manual_seed(0)
    tuner = sdt.apply(AutoModelForCausalLM.from_config(GRANITE), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every factor away from its init: B = 0 would hide A's path
        for p in tuner.trainable_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return tuner


def beside_the_mixers(model: nn.Module) -> list[nn.Linear]:
    """The LoRA-carrying Linear layers outside the Mamba mixers: attention and the shared MLP."""
    inside = {id(sub) for _, mixer in mamba2_mixers(model) for sub in mixer.modules()}
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m) not in inside and parametrize.is_parametrized(m, "weight")
    ]


def runs_activation_path(linear: nn.Module) -> bool:
    return "forward" in linear.__dict__


LORA = sdt.SDTConfig.preset("lora", lora_targets=("out_proj",), lora_rank=2)


def test_a_hybrid_runs_its_attention_and_mlp_lora_in_activation_space_with_the_same_loss_and_gradients():
    tuner = granite_tuner(LORA)
    linears = beside_the_mixers(tuner.model)
    assert len(linears) == 4 + 2 * 3  # q, k, v, o of its attention layer; input and output_linear of 3 MLPs
    tokens, seed = fresh_batch()
    uninstall_fused_path(tuner.model)
    reference = loss_and_grads(tuner, tokens)  # transformers' path, LoRA in weight space
    line = install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels())
    assert f"; LoRA in activation space on {len(linears)} Linear layers beside the mixers" in line, line
    assert all(runs_activation_path(m) for m in linears)
    assert_close(loss_and_grads(tuner, tokens), reference, TOLERANCE, context=f"{line} (batch seed {seed})")
    assert all(p.grad is None for p in (P.original(m, "weight") for m in linears))
    tuner.check_gradients()


def test_a_lora_variant_keeps_weight_space_and_the_line_says_so():
    tuner = granite_tuner(dataclasses.replace(LORA, lora_variant="dora"))
    line = install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels())
    linears = beside_the_mixers(tuner.model)
    kept = {type(m.parametrizations.weight[0]).__name__ for m in linears}
    assert (
        f"; LoRA in activation space on 0 Linear layers beside the mixers ({len(linears)} more keep weight space"
        in line
    )
    assert all(name in line for name in kept), line
    assert not any(runs_activation_path(m) for m in linears)


def test_evaluation_and_removal_give_the_class_forward_back_and_the_state_dict_stays():
    tuner = granite_tuner(LORA)
    uninstall_fused_path(tuner.model)
    state = {k: v.clone() for k, v in tuner.model.state_dict().items()}
    tokens, _ = fresh_batch()
    tuner.model.eval()
    with torch.no_grad():
        plain = tuner.model(input_ids=tokens).logits
    install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels())
    linears = beside_the_mixers(tuner.model)
    with torch.no_grad():  # evaluation runs the class's forward: bitwise the weight-space outputs
        assert torch.equal(tuner.model(input_ids=tokens).logits, plain)
    after = tuner.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())

    uninstall_fused_path(tuner.model)
    for m in linears:
        assert not runs_activation_path(m) and m.forward.__func__ is nn.Linear.forward
    with torch.no_grad():
        assert torch.equal(tuner.model(input_ids=tokens).logits, plain)
    merged = tuner.merge()
    assert not any(runs_activation_path(m) for m in merged.modules() if isinstance(m, nn.Linear))
