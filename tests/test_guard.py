"""The coverage guard: every adapter tensor must get a gradient; a bypassed adapter is named."""

import pytest
import torch
import torch.nn.functional as F
from helpers import random_tokens, train

import sdt
from sdt import SDTConfig


def backward_once(model):
    tokens = random_tokens()
    model(input_ids=tokens, labels=tokens).loss.backward()


def test_guard_passes_when_every_adapter_is_in_the_graph(load_base):
    tuner = sdt.apply(load_base("mamba"), SDTConfig(channels_frozen=0.75, states_frozen=0.5))
    backward_once(tuner.model)
    tuner.check_gradients()  # warmup: dense delta + LoRA (lora_A excused while lora_B is zero)
    train(tuner, 1, check_first=False)
    tuner.start_training(tuner.select())
    backward_once(tuner.model)
    tuner.check_gradients()


def test_guard_names_an_adapter_that_a_kernel_bypasses(load_base):
    """Simulate a fused kernel: x_proj reads its stored weight directly instead of going through the adapter."""
    tuner = sdt.apply(load_base("mamba"), SDTConfig.preset("lora"))
    x_proj = tuner.model.backbone.layers[1].mixer.x_proj
    x_proj.forward = lambda x: F.linear(x, x_proj.parametrizations.weight.original)
    backward_once(tuner.model)
    with pytest.raises(sdt.AdapterCoverageError) as err:
        tuner.check_gradients()
    message = str(err.value)
    assert "backbone.layers.1.mixer.x_proj.parametrizations.weight.0.lora_B: no gradient" in message
    assert "backbone.layers.1.mixer.x_proj.parametrizations.weight.0.lora_A: no gradient" in message
    assert "layers.0" not in message and "out_proj" not in message


def test_guard_flags_an_all_zero_gradient(load_base):
    tuner = sdt.apply(load_base("mamba"), SDTConfig.preset("lora", lora_targets=("out_proj",)))
    backward_once(tuner.model)
    lora_b = dict(tuner.named_trainable_parameters())[
        "backbone.layers.0.mixer.out_proj.parametrizations.weight.0.lora_B"
    ]
    lora_b.grad = torch.zeros_like(lora_b)
    with pytest.raises(
        sdt.AdapterCoverageError, match=r"layers\.0\.mixer\.out_proj\.parametrizations\.weight\.0\.lora_B: all-zero"
    ):
        tuner.check_gradients()


def test_guard_reads_gradients_through_a_given_accessor(load_base):
    tuner = sdt.apply(load_base("mamba"), SDTConfig.preset("lora"))
    backward_once(tuner.model)
    with pytest.raises(sdt.AdapterCoverageError, match="no gradient"):
        tuner.check_gradients(grad_of=lambda p: None)


def test_guard_names_the_layer_whose_sparse_delta_is_bypassed(load_base):
    tuner = sdt.apply(load_base("mamba"), SDTConfig(channels_frozen=0.75, states_frozen=0.5))
    train(tuner, 1, check_first=False)
    tuner.start_training(tuner.select())
    x_proj = tuner.model.backbone.layers[1].mixer.x_proj
    x_proj.forward = lambda x: F.linear(x, x_proj.parametrizations.weight.original)
    backward_once(tuner.model)
    with pytest.raises(sdt.AdapterCoverageError) as err:
        tuner.check_gradients()
    assert str(err.value).startswith(
        "1 adapter tensor(s) got no gradient: backbone.layers.1.mixer.x_proj.weight "
        "(sparse delta in sdt_sparse.x_proj_weight.delta): all-zero gradient."
    )
