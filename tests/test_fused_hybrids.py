"""The fused Mamba-2 path (sdt.fused.mamba2) on each hybrid family's SSM mixers, against transformers' path.

On CPU, with the pure-PyTorch reference kernels, the loss and every trainable tensor's gradient (SDT and LoRA on the
mixers, LoRA on attention and MLP) through transformers' own mixer forward and through the fused path, on the same
model and batch; Falcon-H1's µP multipliers and its optional gated norm included. Marked ``cuda``: each family at a
small real shape on mamba-ssm's kernels, every adapter tensor with a nonzero gradient, the kernel path asserted.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HYBRID_CONFIGS, hybrid_config
from fused_reference import ReferenceMamba2Kernels
from test_fused_linear import beside_the_mixers, runs_activation_path
from test_fused_mamba import loss_and_grads
from test_fused_mamba2 import CUDA_FP32_TOLERANCE, TOLERANCE, assert_close, fresh_batch, warm_up
from transformers import AutoModelForCausalLM

import sdt
from sdt.fused import install_fused_path, mamba2_mixers, uninstall_fused_path

# SDT on a few heads, states and inputs, LoRA on both projections of the mixers and on attention and MLP
CONFIG = sdt.SDTConfig(
    lora_targets=("in_proj", "out_proj"),
    channels_frozen=0.75,
    states_frozen=0.5,
    inputs_frozen=0.5,
    lora_rank=2,
    lora_alpha=2.0,
    warmup_steps=2,
)


def falcon_h1_with_norm(norm_before_gate: bool):
    return hybrid_config("falcon_h1", mamba_rms_norm=True, mamba_norm_before_gate=norm_before_gate)


CPU_CONFIGS = {**HYBRID_CONFIGS, "falcon_h1 with its gated norm": falcon_h1_with_norm(False)}


def training_tuner(model: torch.nn.Module, vocab: int) -> sdt.Tuner:
    """A tuner in its training phase, every adapter tensor away from its init (B = 0 would hide A's path)."""
    tuner = sdt.apply(model, CONFIG)
    warm_up(tuner, vocab)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuner.trainable_parameters():
            p.copy_((0.05 * torch.randn(p.shape, generator=generator)).to(p.device))
    return tuner


def compare_paths(tuner: sdt.Tuner, kernels, tokens: torch.Tensor, tolerance: float) -> str:
    """Loss and gradients on transformers' path, then on the fused one; returns the fused path's log line."""
    uninstall_fused_path(tuner.model)
    reference = loss_and_grads(tuner, tokens)
    line = install_fused_path(tuner.model, kernels=kernels)
    mixers = mamba2_mixers(tuner.model)
    assert f"fused path: {len(mixers)} " in line and "on sdt.fused.mamba2" in line, line
    calls = getattr(kernels, "calls", None)
    fused = loss_and_grads(tuner, tokens)
    if calls is not None:
        assert kernels.calls - calls == len(mixers), "the fused path did not run"
    assert_close(fused, reference, tolerance, context=line)
    assert_attention_and_mlp_in_activation_space(tuner.model, line)
    return line


def assert_attention_and_mlp_in_activation_space(model: torch.nn.Module, line: str) -> None:
    """Every LoRA-carrying Linear beside the mixers (attention, MLP) takes sdt.fused.linear's forward, and the line
    counts them."""
    linears = beside_the_mixers(model)
    assert linears, "the hybrid preset puts LoRA on attention and MLP"
    assert f"; LoRA in activation space on {len(linears)} Linear layers beside the mixers" in line, line
    assert all(runs_activation_path(m) for m in linears)


@pytest.mark.parametrize("arch", list(CPU_CONFIGS))
def test_fused_path_matches_transformers_path_on_each_hybrid(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CPU_CONFIGS[arch])
    tuner = training_tuner(model, vocab=64)
    tokens, seed = fresh_batch()
    line = compare_paths(tuner, ReferenceMamba2Kernels(), tokens, TOLERANCE)
    assert "in_proj=lora r2 + rows" in line and "out_proj=lora r2" in line, f"{line} (batch seed {seed})"


def test_a_gated_norm_before_the_gate_keeps_transformers_path_and_says_why():
    model = AutoModelForCausalLM.from_config(falcon_h1_with_norm(True))
    tuner = sdt.apply(model, CONFIG)
    line = install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels())
    assert line.startswith("fused path: off (a gated norm that normalises before the gate"), line


# -- on the GPU -----------------------------------------------------------------------------------------------------

CUDA_VOCAB = 1024
# each family at a small real shape: 8 heads of 64, state 128, one group, chunk 64 (what the kernels are tuned for)
CUDA_SHAPE = {"vocab_size": CUDA_VOCAB, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}
CUDA_MAMBA = {
    "bamba": {
        "mamba_n_heads": 8, "mamba_d_head": 64, "mamba_n_groups": 1, "mamba_d_state": 128, "mamba_chunk_size": 64,
    },
    "granitemoehybrid": {
        "mamba_n_heads": 8, "mamba_d_head": 64, "mamba_n_groups": 1, "mamba_d_state": 128, "mamba_chunk_size": 64,
        "shared_intermediate_size": 512,
    },
    "nemotron_h": {
        "mamba_num_heads": 8, "mamba_head_dim": 64, "n_groups": 1, "ssm_state_size": 128, "chunk_size": 64,
        "head_dim": 64, "moe_intermediate_size": 128, "moe_shared_expert_intermediate_size": 128,
    },
    "falcon_h1": {
        "mamba_n_heads": 8, "mamba_d_head": 64, "mamba_n_groups": 1, "mamba_d_state": 128, "mamba_chunk_size": 64,
        "mamba_d_ssm": 512, "mamba_expand": 3, "head_dim": 64,
    },
    "zamba2": {
        "n_mamba_heads": 8, "mamba_headdim": 64, "mamba_ngroups": 1, "mamba_d_state": 128, "chunk_size": 64,
        "num_key_value_heads": 4,
    },
}  # fmt: skip


def cuda_config(arch: str):
    return hybrid_config(arch, **CUDA_SHAPE, **CUDA_MAMBA[arch])


def counting_cuda_kernels():
    """mamba-ssm's kernels, counting their forwards (so that a test can tell the fused path ran)."""
    from sdt.fused import CudaMamba2Kernels

    class Counting(CudaMamba2Kernels):
        calls = 0

        def split_conv1d_scan(self, *args, **kwargs):
            self.calls += 1
            return super().split_conv1d_scan(*args, **kwargs)

    return Counting()


@pytest.mark.cuda
@pytest.mark.parametrize("arch", list(HYBRID_CONFIGS))
def test_cuda_each_hybrid_trains_every_adapter_on_the_fused_kernels(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cuda_config(arch)).cuda()
    tuner = training_tuner(model, vocab=CUDA_VOCAB)
    n_mixers = len(mamba2_mixers(tuner.model))
    assert f"fused path: {n_mixers} " in tuner.kernel_path, tuner.kernel_path
    assert "on sdt.fused.mamba2 (mamba_split_conv1d_scan_combined)" in tuner.kernel_path, tuner.kernel_path
    tokens, _ = fresh_batch(batch=2, length=256, vocab=CUDA_VOCAB, device="cuda")
    line = compare_paths(tuner, counting_cuda_kernels(), tokens, CUDA_FP32_TOLERANCE)
    print(f"\n{arch}: {line}")
    tuner.check_gradients()
    zero = [n for n, p in tuner.named_trainable_parameters() if not torch.count_nonzero(p.grad)]
    assert not zero, zero


@pytest.mark.cuda
@pytest.mark.parametrize("arch", list(HYBRID_CONFIGS))
def test_cuda_bf16_hybrid_sdlora_from_apply_runs_fused(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cuda_config(arch))
    model = sdt.to_compute_dtype(model, torch.bfloat16).cuda()
    tuner = sdt.apply(model, sdt.SDTConfig(warmup_steps=1))  # the hybrid preset: SDT + LoRA, attention and MLP LoRA
    assert "on sdt.fused.mamba2 (mamba_split_conv1d_scan_combined)" in tuner.kernel_path, tuner.kernel_path
    assert_attention_and_mlp_in_activation_space(tuner.model, tuner.kernel_path)
    kernels = counting_cuda_kernels()
    install_fused_path(tuner.model, kernels=kernels)
    tokens, _ = fresh_batch(batch=2, length=512, vocab=CUDA_VOCAB, device="cuda")
    loss, _ = loss_and_grads(tuner, tokens)
    assert torch.isfinite(loss) and kernels.calls == len(mamba2_mixers(tuner.model))
    tuner.check_gradients()
    # attention's and MLP's LoRA, trained from activations in bf16: B starts at zero, so A's gradient is zero yet
    zero = [
        m for m in beside_the_mixers(tuner.model) if not torch.count_nonzero(m.parametrizations.weight[0].lora_B.grad)
    ]
    assert not zero, zero
