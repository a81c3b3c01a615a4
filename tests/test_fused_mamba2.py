"""The fused Mamba-2 path (sdt.fused.mamba2) against transformers' path.

On CPU, with the pure-PyTorch reference kernels (``ReferenceMamba2Kernels``), every test computes the loss and every
trainable tensor's gradient twice on the same model and batch: through transformers' own ``Mamba2Mixer`` forward (its
PyTorch chunked scan here) and through the fused path. Marked ``cuda``: the same on mamba-ssm's kernels, where
transformers' path is its kernel path (``mamba_split_conv1d_scan_combined`` on the effective weights).
"""

from __future__ import annotations

import random

import pytest
import torch
from fused_reference import ReferenceMamba2Kernels
from helpers import VOCAB
from test_fused_mamba import RecordBackward, loss_and_grads, move_adapters_off_init
from transformers import Mamba2Config, Mamba2ForCausalLM

import sdt
from sdt import parametrize as P
from sdt.fused import CudaMamba2Kernels, install_fused_path, mamba2_mixers, uninstall_fused_path

# fp32 on both paths; they differ in the scan (a per-step recurrence against transformers' chunked one) and in the
# order of the projections' sums (x W0ᵀ + x Δᵀ against x (W0 + Δ)ᵀ): rounding, ~1e-6 relative, up to 8e-6 over six
# batch seeds for the sparse B/C-row delta (a gradient of few entries, each a sum with cancellation); an adapter
# left out or applied twice is off by its whole contribution, order 1
TOLERANCE = 5e-5
# tiny Mamba-2 (tests/conftest.py): 8 heads in 2 groups, 8 states, 16 inputs; ratios that select some of each
SDT_COUNTS = {"channels_frozen": 0.75, "states_frozen": 0.5, "inputs_frozen": 0.5, "warmup_steps": 2}
BOTH_PROJECTIONS = ("in_proj", "out_proj")
METHODS = {
    "lora": sdt.SDTConfig.preset("lora", lora_targets=BOTH_PROJECTIONS),
    "sdlora": sdt.SDTConfig.preset("sdlora", lora_targets=BOTH_PROJECTIONS, **SDT_COUNTS),
    "sdt": sdt.SDTConfig.preset("sdt", **SDT_COUNTS),
    "full": sdt.SDTConfig.preset("full"),
}


def fresh_batch(batch: int = 3, length: int = 12, vocab: int = VOCAB, device: str = "cpu") -> tuple[torch.Tensor, int]:
    seed = random.randrange(2**31)
    tokens = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return tokens.to(device), seed


def warm_up(tuner: sdt.Tuner, vocab: int = VOCAB) -> None:
    """Two plain gradient steps of warmup, for real updates to rank, then the training phase."""
    device = next(tuner.model.parameters()).device.type
    for _ in range(2):
        tokens, _ = fresh_batch(vocab=vocab, device=device)
        tuner.model(input_ids=tokens, labels=tokens).loss.backward()
        with torch.no_grad():
            for p in tuner.trainable_parameters():
                p -= 0.1 * p.grad
        tuner.model.zero_grad(set_to_none=True)
    tuner.start_training(tuner.select())


def training_tuner(model: torch.nn.Module, method: str, vocab: int = VOCAB) -> sdt.Tuner:
    """A tuner in its training phase with every adapter tensor away from its init (B = 0 would hide A's path)."""
    tuner = sdt.apply(model, METHODS[method])
    if tuner.phase == "warmup":
        warm_up(tuner, vocab)
    if method != "full":
        move_adapters_off_init(tuner)
    return tuner


def relative_error(g: torch.Tensor, reference: torch.Tensor) -> float:
    return ((g.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30)).item()


def assert_close(fused, reference, tolerance: float, context: str) -> None:
    (loss, grads), (loss_ref, grads_ref) = fused, reference
    assert abs(loss.item() - loss_ref.item()) <= tolerance * abs(loss_ref.item()), context
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        error = relative_error(grads[name], ref)
        assert error <= tolerance, f"{context}: {name} relative error {error:.2e}"


def compare_paths(tuner: sdt.Tuner, kernels, tokens: torch.Tensor, mask=None, tolerance: float = TOLERANCE) -> str:
    """Loss and gradients on transformers' path, then on the fused one; returns the fused path's log line."""
    uninstall_fused_path(tuner.model)
    reference = loss_and_grads(tuner, tokens, mask)
    line = install_fused_path(tuner.model, kernels=kernels)
    assert "Mamba2Mixers on sdt.fused.mamba2" in line, line
    calls = getattr(kernels, "calls", None)
    fused = loss_and_grads(tuner, tokens, mask)
    if calls is not None:
        assert kernels.calls - calls == len(mamba2_mixers(tuner.model)), "the fused path did not run"
    assert_close(fused, reference, tolerance, context=line)
    return line


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_path_matches_transformers_path(load_base, method):
    tuner = training_tuner(load_base("mamba2"), method)
    tokens, _ = fresh_batch()
    line = compare_paths(tuner, ReferenceMamba2Kernels(), tokens)
    if method == "sdlora":  # every adapter is applied beside its frozen base
        assert "in_proj=lora r8 + rows 64:96 (SparseDeltaView), out_proj=lora r8" in line, line
        assert "A_log=SparseDeltaView" in line, line


@pytest.mark.parametrize("method", ["lora", "sdlora", "sdt"])
def test_no_big_weight_gradient_and_no_copy_of_a_frozen_weight(load_base, method, monkeypatch):
    """In a fused training step, no op outputs a tensor of in_proj's or out_proj's shape (a W0 + Δ, or a weight
    gradient), nor the stacked B/C blocks that the weight-space path's sparse group forms; the guard passes."""
    tuner = training_tuner(load_base("mamba2"), method)
    kernels = ReferenceMamba2Kernels()
    install_fused_path(tuner.model, kernels=kernels)
    mixers = mamba2_mixers(tuner.model)
    big = {tuple(getattr(m, n).weight.shape) for _, m in mixers for n in ("in_proj", "out_proj")}
    tokens, _ = fresh_batch()
    tuner.model.train().zero_grad(set_to_none=True)
    with RecordBackward.MatmulShapes() as forward_shapes:
        loss = tuner.model(input_ids=tokens, labels=tokens).loss
    with RecordBackward.MatmulShapes() as backward_shapes:
        loss.backward()
    assert kernels.calls == len(mixers), "the fused path did not run"
    assert not big & (forward_shapes.shapes | backward_shapes.shapes)
    tuner.check_gradients()
    if method != "lora":
        in_proj_group = getattr(tuner.model, P.SPARSE_GROUPS)["in_proj_weight"]
        assert in_proj_group.rows == (64, 96)  # 2·inner .. 2·inner + 2·groups·states
        assert in_proj_group._shared is None, "the forward pre-hook formed W0 + Δ for the B/C rows"


def test_sdlora_warmup_phase_runs_fused(load_base):
    """Warmup: a dense fp32 delta on A_log and on in_proj's B/C rows next to LoRA on both projections."""
    tuner = sdt.apply(load_base("mamba2"), METHODS["sdlora"])
    kernels = ReferenceMamba2Kernels()
    tokens, _ = fresh_batch()
    with torch.no_grad():
        for p in tuner.trainable_parameters():
            p.copy_(0.05 * torch.randn_like(p))
    line = compare_paths(tuner, kernels, tokens)
    assert "in_proj=lora r8 + rows 64:96 (DenseDelta)" in line and "A_log=DenseDelta" in line, line


def test_padding_mask_is_applied_as_on_transformers_path(load_base):
    """Right padding, as the pipeline pads: the real tokens' loss and every gradient agree."""
    tuner = training_tuner(load_base("mamba2"), "sdlora")
    tokens, _ = fresh_batch()
    mask = torch.ones_like(tokens)
    mask[0, -4:] = 0
    mask[2, -1:] = 0
    compare_paths(tuner, ReferenceMamba2Kernels(), tokens, mask=mask)


def test_eval_and_generation_run_transformers_forward(load_base):
    tuner = training_tuner(load_base("mamba2"), "sdlora")
    kernels = ReferenceMamba2Kernels()
    install_fused_path(tuner.model, kernels=kernels)
    tokens, _ = fresh_batch()
    tuner.model.eval()
    with torch.no_grad():
        logits = tuner.model(input_ids=tokens).logits
        tuner.model.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False)
    assert kernels.calls == 0
    uninstall_fused_path(tuner.model)
    with torch.no_grad():
        assert torch.equal(tuner.model(input_ids=tokens).logits, logits)


def test_merge_gives_the_logits_of_the_adapted_model(load_base):
    tuner = training_tuner(load_base("mamba2"), "sdlora")
    install_fused_path(tuner.model, kernels=ReferenceMamba2Kernels())
    tokens, _ = fresh_batch()
    tuner.model.eval()
    with torch.no_grad():
        adapted = tuner.model(input_ids=tokens).logits
        merged = tuner.merge()(input_ids=tokens).logits
    assert all("forward" not in m.__dict__ for _, m in mamba2_mixers(tuner.model))
    # fp32: W0 + Δ formed once at merge against on every read before; the same sums
    torch.testing.assert_close(merged, adapted, rtol=0, atol=0)


# -- on the GPU -----------------------------------------------------------------------------------------------------

CUDA_VOCAB = 1024
# a Mamba-2 block at a small real shape: 8 heads of 64, state 128, one group (the 130m checkpoint's layout)
CUDA_CONFIG = Mamba2Config(
    vocab_size=CUDA_VOCAB,
    hidden_size=256,
    num_hidden_layers=2,
    state_size=128,
    num_heads=8,
    head_dim=64,
    n_groups=1,
    expand=2,
    chunk_size=64,
)
# fp32 on both paths through the same Triton kernels; the projections' sums differ in order (x W0ᵀ + x Δᵀ against
# x (W0 + Δ)ᵀ), and the kernels' dot products run in tf32 (Triton's default on Hopper), which carries those
# rounding differences on at ~1e-3 relative; an adapter left out would be off by its whole contribution (order 1)
CUDA_FP32_TOLERANCE = 5e-3


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lora", "sdlora", "sdt"])
def test_cuda_fused_path_matches_transformers_kernel_path(method):
    torch.manual_seed(0)
    model = Mamba2ForCausalLM(CUDA_CONFIG).cuda()
    tuner = training_tuner(model, method, vocab=CUDA_VOCAB)
    assert "on sdt.fused.mamba2 (mamba_split_conv1d_scan_combined)" in tuner.kernel_path, tuner.kernel_path
    tokens, _ = fresh_batch(batch=2, length=256, vocab=CUDA_VOCAB, device="cuda")
    line = compare_paths(tuner, CudaMamba2Kernels(), tokens, tolerance=CUDA_FP32_TOLERANCE)
    print(f"\n{method}: {line}")
    tuner.check_gradients()
    assert all(torch.count_nonzero(p.grad) for p in tuner.trainable_parameters())


@pytest.mark.cuda
def test_cuda_bf16_sdlora_trains_every_adapter_on_the_fused_path():
    torch.manual_seed(0)
    model = Mamba2ForCausalLM(CUDA_CONFIG).cuda().to(torch.bfloat16)
    tuner = training_tuner(model, "sdlora", vocab=CUDA_VOCAB)
    assert "sdt.fused.mamba2" in install_fused_path(tuner.model)
    tokens, _ = fresh_batch(batch=2, length=512, vocab=CUDA_VOCAB, device="cuda")
    loss, grads = loss_and_grads(tuner, tokens)
    assert torch.isfinite(loss)
    tuner.check_gradients()
    assert all(torch.count_nonzero(g) for g in grads.values()), [n for n, g in grads.items() if not g.count_nonzero()]
