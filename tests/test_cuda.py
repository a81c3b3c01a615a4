"""On the GPU with the mamba-ssm / causal-conv1d kernels: bf16, fused paths, every adapter gets a gradient.

Run on a CUDA machine: ``python -m pytest -m cuda -v``. Skipped elsewhere (conftest).
"""

import pytest
import torch
from helpers import assert_mamba1_invariants, assert_mamba2_invariants, kernel_jamba_config, kernel_mamba2_config
from transformers import JambaForCausalLM, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

import sdt
from pipeline.trial.models import kernel_paths

pytestmark = pytest.mark.cuda
VOCAB = 512


def bf16_model(model_class, config):
    torch.manual_seed(0)
    return sdt.to_compute_dtype(model_class(config), torch.bfloat16).cuda()


def tokens(seed, batch=4, length=256):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator).cuda()


def run_phase(tuner, steps, seed, lr=1e-2):
    """Train ``steps`` steps; the coverage guard runs after the first backward."""
    optimizer = torch.optim.AdamW(tuner.trainable_parameters(), lr=lr, weight_decay=0.0, fused=True)
    tuner.model.train()
    for step in range(steps):
        batch = tokens(seed + step)
        loss = tuner.model(input_ids=batch, labels=batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        if step == 0:
            tuner.check_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def sdlora_cycle(model, config):
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = sdt.mixers(model)
    tuner = sdt.apply(model, config)
    run_phase(tuner, config.warmup_steps, seed=0)
    selection = tuner.select()
    tuner.start_training(selection)
    run_phase(tuner, 5, seed=100)
    for name, param in tuner.named_trainable_parameters():
        assert param.dtype == torch.float32, name
    num_trainable = tuner.num_trainable_parameters()
    merged = {k: v.detach().clone() for k, v in tuner.merge().state_dict().items()}
    return base, merged, selection, layers, num_trainable


def test_mamba_sdlora_on_the_fused_cuda_path():
    paths = kernel_paths("mamba")
    assert paths == {
        "mamba_inner_fn": "mamba_ssm",
        "mamba_selective_scan": "mamba_ssm",
        "causal_conv1d_fn": "causal_conv1d",
    }
    config = MambaConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, state_size=16)
    model = bf16_model(MambaForCausalLM, config)
    mixer = model.backbone.layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == torch.float32 and mixer.x_proj.weight.dtype == torch.bfloat16
    cfg = sdt.SDTConfig(warmup_steps=5)  # the paper's ratios: 0.99 of 512 channels -> 5 train, 0.75 of 16 states -> 4
    base, merged, selection, layers, num_trainable = sdlora_cycle(model, cfg)
    per_layer = 5 * 4 + 2 * 16 * 5 + 8 * (512 + 256)
    assert num_trainable == 4 * per_layer
    assert_mamba1_invariants(base, merged, selection, layers, exact_columns=False)


def test_weight_space_lora_trains_every_projection_on_the_fused_path():
    """PEFT's module-wrapping LoRA on x_proj / dt_proj gets no gradient here; ours must (the guard checks)."""
    model = bf16_model(MambaForCausalLM, MambaConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2))
    tuner = sdt.apply(model, sdt.SDTConfig.preset("lora", lora_targets=("in_proj", "x_proj", "dt_proj", "out_proj")))
    run_phase(tuner, 2, seed=0)
    run_phase(tuner, 1, seed=10)  # lora_B is nonzero now, so lora_A must have a nonzero gradient as well


def test_mamba2_sdlora_on_the_triton_path():
    paths = kernel_paths("mamba2")
    assert paths["mamba2_split_conv1d_scan_combined"] == "mamba_ssm" and paths["causal_conv1d_fn"] == "causal_conv1d"
    config = kernel_mamba2_config(VOCAB)
    model = bf16_model(Mamba2ForCausalLM, config)
    cfg = sdt.SDTConfig(warmup_steps=5, channels_frozen=6, states_frozen=0.75, inputs_frozen=0.99)
    base, merged, selection, layers, num_trainable = sdlora_cycle(model, cfg)
    k_d = 256 - round(0.99 * 256)
    expected = sum(2 + 2 * s["groups"].numel() * 16 * k_d + 8 * (512 + 256) for s in selection.values())
    assert num_trainable == expected
    assert_mamba2_invariants(base, merged, selection, layers, exact_rows=False)


def test_jamba_sdlora_on_the_cuda_kernels():
    assert kernel_paths("jamba") == {"mamba_selective_scan": "mamba_ssm", "causal_conv1d_fn": "causal_conv1d"}
    config = kernel_jamba_config(VOCAB)
    model = bf16_model(JambaForCausalLM, config)
    cfg = sdt.SDTConfig(warmup_steps=5, channels_frozen=250)
    base, merged, selection, layers, _ = sdlora_cycle(model, cfg)
    assert len(layers) == 3  # attention layer 1 untouched
    assert_mamba1_invariants(base, merged, selection, layers, exact_columns=False)
