"""The state-based methods (sdt.state, docs/method.md §8): state-offset and initial-state tuning on Mamba-1, Jamba and
Mamba-2, against a reference written from the paper's equations as a per-token recurrence (fp32, CPU); their fused
paths through the reference kernels (CPU) and the CUDA kernels (marked ``cuda``); save, load and merge."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIGS
from fused_reference import ReferenceKernels, ReferenceMamba2Kernels
from helpers import VOCAB
from test_fused_mamba import loss_and_grads
from test_fused_mamba2 import CUDA_CONFIG as CUDA_MAMBA2
from test_fused_mamba2 import CUDA_FP32_TOLERANCE
from test_packing import random_examples
from transformers import Mamba2ForCausalLM

import sdt
from pipeline.tasks.batching import packed_row
from sdt.fused import install_fused_path, keeps_packed_examples_apart, uninstall_fused_path
from sdt.state import state_adapter, state_shape

ARCHS = ("mamba", "jamba", "mamba2")
METHODS = ("state-offset", "initial-state")
# fp32 throughout; the model's forward and the reference sum in different orders (einsum against a per-state loop):
# ~1e-6 relative seen; a state tensor left out or applied at the wrong place is off by its whole contribution
TOLERANCE = 1e-5


def tiny_model(arch: str) -> torch.nn.Module:
    model_class, config = TINY_CONFIGS[arch]
    return model_class(config).float()


def trained_tuner(arch: str, method: str, **overrides) -> sdt.Tuner:
    """A tuner whose trainable tensors are away from their zero start (a zero state would hide a wrong path)."""
    tuner = sdt.apply(tiny_model(arch), sdt.SDTConfig.preset(method, **overrides))
    generator = torch.Generator().manual_seed(random.randrange(2**31))
    with torch.no_grad():
        for p in tuner.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return tuner


def tokens(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(random.randrange(2**31)))


# -- the reference: the paper's equations, one token at a time --------------------------------------------------------


def causal_conv_step(weight: torch.Tensor, bias: torch.Tensor | None, inputs: list[torch.Tensor]) -> torch.Tensor:
    """SiLU(Σ_k w[:, k] · x_{t-K+1+k} + b) over the inputs so far (zeros before the first)."""
    width = weight.shape[-1]
    window = [torch.zeros_like(inputs[0])] * max(0, width - len(inputs)) + inputs[-width:]
    value = sum(weight[:, 0, k] * window[k] for k in range(width))
    return F.silu(value if bias is None else value + bias)


def reference_mamba1(mixer, hidden: torch.Tensor, kind: str, value: torch.Tensor) -> torch.Tensor:
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t from h_0 = h⁰ (initial) or 0; y_t = (C_t·(h_t + h') + D x_t) SiLU(z_t)."""
    A = -torch.exp(mixer.A_log)
    inner, rank, states = A.shape[0], mixer.time_step_rank, A.shape[1]
    outputs = []
    for sequence in hidden:
        h = value.clone() if kind == "initial" else torch.zeros_like(A)
        offset = value if kind == "offset" else torch.zeros_like(A)
        conv_inputs, ys = [], []
        for token in sequence:
            xz = mixer.in_proj.weight @ token
            x, z = xz[:inner], xz[inner:]
            conv_inputs.append(x)
            u = causal_conv_step(mixer.conv1d.weight, mixer.conv1d.bias, conv_inputs)
            proj = mixer.x_proj.weight @ u
            dt_low, B, C = proj[:rank], proj[rank : rank + states], proj[rank + states :]
            if hasattr(mixer, "dt_layernorm"):  # Jamba normalises the three
                dt_low, B, C = mixer.dt_layernorm(dt_low), mixer.b_layernorm(B), mixer.c_layernorm(C)
            delta = F.softplus(mixer.dt_proj.weight @ dt_low + mixer.dt_proj.bias)  # (E,)
            h = torch.exp(delta[:, None] * A) * h + (delta * u)[:, None] * B[None, :]
            y = (h + offset) @ C + mixer.D * u
            ys.append(mixer.out_proj.weight @ (y * F.silu(z)))
        outputs.append(torch.stack(ys))
    return torch.stack(outputs)


def reference_mamba2(mixer, hidden: torch.Tensor, kind: str, value: torch.Tensor) -> torch.Tensor:
    """Per head h of group g: h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ from h⁰ or 0; y_t = (h_t + h')C_t + D x_t;
    out = W_out · RMSNorm_groups(y · SiLU(z))."""
    A = -torch.exp(mixer.A_log)
    heads, head_dim, groups, states = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    dim = heads * head_dim
    outputs = []
    for sequence in hidden:
        h = value.clone() if kind == "initial" else torch.zeros(heads, head_dim, states)
        offset = value if kind == "offset" else torch.zeros(heads, head_dim, states)
        conv_inputs, ys = [], []
        for token in sequence:
            proj = mixer.in_proj.weight @ token
            z, xbc, dt = proj[:dim], proj[dim : dim + mixer.conv_dim], proj[dim + mixer.conv_dim :]
            conv_inputs.append(xbc)
            xbc = causal_conv_step(mixer.conv1d.weight, mixer.conv1d.bias, conv_inputs)
            x = xbc[:dim].view(heads, head_dim)
            B = xbc[dim : dim + groups * states].view(groups, states)
            C = xbc[dim + groups * states :].view(groups, states)
            delta = F.softplus(dt + mixer.dt_bias).clamp(*mixer.time_step_limit)  # (H,)
            y = torch.empty(heads, head_dim)
            for head in range(heads):
                g = head // (heads // groups)
                h[head] = torch.exp(delta[head] * A[head]) * h[head] + delta[head] * torch.outer(x[head], B[g])
                y[head] = (h[head] + offset[head]) @ C[g] + mixer.D[head] * x[head]
            gated = (y.reshape(dim) * F.silu(z)).view(groups, -1)
            normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + mixer.norm.variance_epsilon)
            ys.append(mixer.out_proj.weight @ (mixer.norm.weight * normed.reshape(dim)))
        outputs.append(torch.stack(ys))
    return torch.stack(outputs)


def mixer_outputs(tuner: sdt.Tuner, ids: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """(mixer, its input, its output) of every mixer in one forward of the model."""
    seen = []
    hooks = [
        mixer.register_forward_hook(
            lambda m, args, kwargs, out: seen.append((m, (args[0] if args else kwargs["hidden_states"]), out)),
            with_kwargs=True,
        )
        for _, mixer in tuner.mixers
    ]
    try:
        with torch.no_grad():
            tuner.model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_mixer_equals_the_papers_recurrence(arch, method):
    tuner = trained_tuner(arch, method)
    tuner.model.eval()
    seen = mixer_outputs(tuner, tokens())
    assert len(seen) == len(tuner.mixers)
    reference = reference_mamba2 if arch == "mamba2" else reference_mamba1
    for mixer, hidden, output in seen:
        adapter = state_adapter(mixer)
        with torch.no_grad():
            expected = reference(mixer, hidden, adapter.kind, adapter.value)
        error = ((output - expected).norm() / expected.norm()).item()
        assert error <= TOLERANCE, f"{arch} {method}: relative error {error:.2e}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_a_zero_state_leaves_the_base_model_and_every_state_trains(arch, method):
    base = tiny_model(arch)
    tuner = sdt.apply(tiny_model(arch), sdt.SDTConfig.preset(method))
    tuner.model.load_state_dict(base.state_dict(), strict=False)
    ids = tokens()
    with torch.no_grad():
        # fp32, same weights and a zero state: only the summation order differs (the state path's scan is its own)
        torch.testing.assert_close(tuner.model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    tuner.model.train()
    tuner.model(input_ids=ids, labels=ids).loss.backward()
    tuner.check_gradients()  # every mixer's state tensor gets a nonzero gradient
    assert {name.rsplit(".", 1)[-1] for name, _ in tuner.named_trainable_parameters()} == {sdt.METHODS[method].state}


CASES = [(arch, method, ()) for arch in ARCHS for method in METHODS] + [
    ("mamba", "state-offset", ("out_proj",)),
    ("mamba2", "initial-state", ("in_proj", "out_proj")),
]


@pytest.mark.parametrize(("arch", "method", "lora"), CASES)
def test_fused_path_through_the_reference_kernels_matches_the_state_forward(arch, method, lora):
    tuner = trained_tuner(arch, method, lora_targets=lora)
    ids = tokens()
    uninstall_fused_path(tuner.model)
    loss_ref, grads_ref = loss_and_grads(tuner, ids)
    kernels = ReferenceMamba2Kernels() if arch == "mamba2" else ReferenceKernels()
    line = install_fused_path(tuner.model, kernels=kernels)
    assert "on sdt.fused" in line, line
    loss, grads = loss_and_grads(tuner, ids)
    # fp32 on both sides; the fused path sums the state's term apart from the scan: ~1e-6 relative
    assert abs(loss.item() - loss_ref.item()) <= TOLERANCE * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        assert torch.count_nonzero(grads[name]), name
        error = ((grads[name] - ref).norm() / ref.norm()).item()
        assert error <= 1e-4, f"{name}: relative error {error:.2e}"  # gradients: longer sums than the loss
    tuner.check_gradients()


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_path_starts_a_left_padded_sequence_from_the_initial_state(arch):
    """Pads take no step on both paths, so h⁰ reaches each sequence's first token undecayed."""
    tuner = trained_tuner(arch, "initial-state")
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    uninstall_fused_path(tuner.model)
    loss_ref, grads_ref = loss_and_grads(tuner, ids, mask)
    install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels() if arch == "mamba2" else ReferenceKernels())
    loss, grads = loss_and_grads(tuner, ids, mask)
    assert abs(loss.item() - loss_ref.item()) <= TOLERANCE * abs(loss_ref.item())  # fp32, as above
    for name, ref in grads_ref.items():
        assert ((grads[name] - ref).norm() / ref.norm()).item() <= 1e-4, name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_gives_the_same_logits(arch, method, tmp_path):
    tuner = trained_tuner(arch, method, lora_targets=("out_proj",))
    sdt.save(tuner, tmp_path / "adapter")
    loaded = sdt.load(tiny_model(arch), tmp_path / "adapter")
    loaded.model.load_state_dict(tuner.model.state_dict())  # same base weights (the tiny models are random)
    ids = tokens()
    with torch.no_grad():
        tuner.model.eval(), loaded.model.eval()
        assert torch.equal(loaded.model(input_ids=ids).logits, tuner.model(input_ids=ids).logits)
    stored = sdt.load(tiny_model(arch), tmp_path / "adapter")
    for (name, p), (_, q) in zip(tuner.named_trainable_parameters(), stored.named_trainable_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("method", METHODS)
def test_merge_is_refused_in_one_line_naming_the_method(method, tmp_path):
    tuner = trained_tuner("mamba", method)
    with pytest.raises(sdt.SDTConfigError, match=f"'{method}' trains a state") as refused:
        tuner.merge()
    assert "\n" not in str(refused.value)
    with pytest.raises(sdt.SDTConfigError, match=method):
        sdt.save_merged(tuner, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not tuner.merged and state_adapter(tuner.mixers[0][1]) is not None  # the tuner trains on


# -- CUDA ------------------------------------------------------------------------------------------------------------


# The GPU models: tests/conftest.py's tiny Mamba and Jamba, and Mamba-2 at test_fused_mamba2.py's small real shape
# (the Triton kernels want head_dim and state sizes of real checkpoints)
CUDA_MODELS = {
    "mamba": lambda: tiny_model("mamba"),
    "jamba": lambda: tiny_model("jamba"),
    "mamba2": lambda: Mamba2ForCausalLM(CUDA_MAMBA2),
}
# fp32. Mamba-1 / Jamba: the CUDA selective scan against a per-step loop sums in another order, as
# tests/test_fused_cuda.py measures (loss within 1e-4, gradients ≤ 1e-4 on a few layers; 1e-2 its bound). Mamba-2:
# Triton's dot products run in tf32 on Hopper, ~1e-3 relative (tests/test_fused_mamba2.py's 5e-3). A state term
# missed or misplaced is off by its whole contribution, order 1.
CUDA_TOLERANCE = {"mamba": (1e-4, 1e-2), "jamba": (1e-4, 1e-2), "mamba2": (CUDA_FP32_TOLERANCE, CUDA_FP32_TOLERANCE)}


@pytest.mark.cuda
@pytest.mark.parametrize(("arch", "method", "lora"), CASES)
def test_cuda_fused_path_matches_the_state_forward(arch, method, lora):
    """On the GPU: the fused path (CUDA kernels) against sdt.state's step-by-step forward on the same GPU, fp32."""
    torch.manual_seed(0)
    tuner = sdt.apply(CUDA_MODELS[arch]().cuda(), sdt.SDTConfig.preset(method, lora_targets=lora))
    with torch.no_grad():
        for p in tuner.trainable_parameters():
            p.copy_(0.3 * torch.randn_like(p))
    line = install_fused_path(tuner.model)
    assert "on sdt.fused" in line and "reference" not in line and f"state {sdt.METHODS[method].state}" in line, line
    vocab = tuner.model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 256), generator=torch.Generator().manual_seed(random.randrange(2**31))).cuda()
    loss, grads = loss_and_grads(tuner, ids)
    tuner.check_gradients()
    uninstall_fused_path(tuner.model)
    loss_ref, grads_ref = loss_and_grads(tuner, ids)
    loss_tolerance, grad_tolerance = CUDA_TOLERANCE[arch]
    assert abs(loss.item() - loss_ref.item()) <= loss_tolerance * abs(loss_ref.item())
    for name, ref in grads_ref.items():
        assert torch.count_nonzero(grads[name]), name
        error = ((grads[name] - ref).norm() / ref.norm()).item()
        print(f"{arch} {method} {name}: relative error {error:.2e}")
        assert error <= grad_tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_bf16_fused_path_trains_every_state_tensor(arch, method):
    """In bf16, the trained dtype, with left padding: finite, every state tensor (fp32) gets a gradient, and the
    loss is the fp32 step-by-step forward's to bf16 rounding."""
    torch.manual_seed(0)
    model = sdt.to_compute_dtype(CUDA_MODELS[arch]().cuda(), torch.bfloat16)
    tuner = sdt.apply(model, sdt.SDTConfig.preset(method))
    with torch.no_grad():
        for p in tuner.trainable_parameters():
            p.copy_(0.3 * torch.randn_like(p))
    assert "on sdt.fused" in tuner.kernel_path, tuner.kernel_path
    ids = torch.randint(0, model.config.vocab_size, (2, 256), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :40] = 0
    loss, grads = loss_and_grads(tuner, ids, mask)
    tuner.check_gradients()
    assert torch.isfinite(loss) and all(g.dtype == torch.float32 for g in grads.values())
    uninstall_fused_path(model)
    reference, _ = loss_and_grads(tuner, ids, mask)
    # bf16 keeps 8 bits of mantissa (4e-3 relative) through every projection; a state term missed is order 1
    assert abs(loss.item() - reference.item()) <= 2e-2 * abs(reference.item())


def test_a_mixer_whose_forward_the_state_path_does_not_reproduce_is_refused():
    """Falcon-H1's mixer scales in_proj's input and output by µP multipliers, which sdt.state's forward leaves out:
    refused in one line naming the mixer, not trained on a different function."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    config = FalconH1Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1,
    )  # fmt: skip
    mixer = FalconH1ForCausalLM(config).model.layers[0].mamba
    with pytest.raises(sdt.SDTConfigError, match=r"^method: the state methods do not take FalconH1Mixer yet"):
        state_shape(mixer)


@pytest.mark.parametrize("method", METHODS)
def test_packed_rows_are_refused_with_a_state_and_auto_batching_does_not_pack(method):
    """A packed row's examples after the first would not start from h⁰ (the kernel starts them from zero), and an
    offset's C, recomputed beside the kernel, would see the example before: refused, not trained on."""
    tuner = trained_tuner("mamba2", method)
    install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels())
    assert not keeps_packed_examples_apart(tuner.model)
    tuner.model.train()
    with pytest.raises(ValueError, match=rf"^seq_idx: packed rows with a state {sdt.METHODS[method].state}"):
        tuner.model(**packed_row(random_examples([5, 6], VOCAB, seed=2)))
