"""The fused PEFT path (sdt.fused) against transformers' path, on CPU with pure-PyTorch reference kernels.

Every test computes the loss and every trainable tensor's gradient twice on the same model and the same fresh
random batch: through transformers' own mixer forward (its PyTorch fallback here) and through
``sdt.fused.MambaInnerFn`` with ``ReferenceKernels``. In fp32 the two must agree to 1e-5 (relative). The same
Function runs the CUDA kernels on a GPU (tests/test_fused_cuda.py).
"""

from __future__ import annotations

import random

import pytest
import torch
from fused_reference import ReferenceKernels
from helpers import VOCAB
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import sdt
from sdt import parametrize as P
from sdt.fused import MambaInnerFn, install_fused_path, mamba1_mixers, uninstall_fused_path

KERNELS = ReferenceKernels()
TOLERANCE = 1e-5
# tiny models: 32 inner channels, 8 states; a ratio freezes few enough of them to select something
SDT_COUNTS = {"channels_frozen": 0.75, "states_frozen": 0.5, "warmup_steps": 2}
METHODS = {
    "lora": sdt.SDTConfig.preset("lora", lora_targets=("in_proj", "x_proj", "dt_proj", "out_proj")),
    "sdlora": sdt.SDTConfig.preset("sdlora", **SDT_COUNTS),
    "sdt": sdt.SDTConfig.preset("sdt", **SDT_COUNTS),
    "full": sdt.SDTConfig.preset("full"),
}


def fresh_batch(batch: int = 3, length: int = 10) -> tuple[torch.Tensor, int]:
    seed = random.randrange(2**31)
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed)), seed


def training_tuner(model: torch.nn.Module, method: str) -> sdt.Tuner:
    """A tuner in its training phase with every adapter tensor away from its init (B = 0 would hide A's path)."""
    tuner = sdt.apply(model, METHODS[method])
    if tuner.phase == "warmup":
        tokens, _ = fresh_batch()
        for _ in range(2):  # real warmup updates to rank
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            with torch.no_grad():
                for p in tuner.trainable_parameters():
                    p -= 0.1 * p.grad
            model.zero_grad(set_to_none=True)
        tuner.start_training(tuner.select())
    if method != "full":
        move_adapters_off_init(tuner)
    return tuner


def move_adapters_off_init(tuner: sdt.Tuner) -> None:
    """Every trainable tensor random (B = 0 at init would hide A's path)."""
    generator = torch.Generator().manual_seed(random.randrange(2**31))
    with torch.no_grad():
        for p in tuner.trainable_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def loss_and_grads(tuner: sdt.Tuner, tokens: torch.Tensor, mask: torch.Tensor | None = None):
    tuner.model.train()
    tuner.model.zero_grad(set_to_none=True)
    loss = tuner.model(input_ids=tokens, labels=tokens, attention_mask=mask).loss
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in tuner.named_trainable_parameters()}


def assert_close(loss, grads, loss_ref, grads_ref, context: str) -> None:
    assert abs(loss.item() - loss_ref.item()) <= TOLERANCE * abs(loss_ref.item()), context
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        error = (grads[name] - ref).norm() / ref.norm().clamp_min(1e-30)
        assert error <= TOLERANCE, f"{context}: {name} relative error {error:.2e}"


def count_fused_calls(monkeypatch) -> list[int]:
    calls = []
    original = MambaInnerFn.forward

    def forward(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    monkeypatch.setattr(MambaInnerFn, "forward", staticmethod(forward))
    return calls


def compare_paths(
    tuner: sdt.Tuner, monkeypatch, mask: torch.Tensor | None = None, tokens: torch.Tensor | None = None
) -> str:
    """Loss and gradients on transformers' path, then on the fused one; returns the fused path's log line."""
    if tokens is None:
        tokens, seed = fresh_batch()
    else:
        seed = "given"
    uninstall_fused_path(tuner.model)
    calls = count_fused_calls(monkeypatch)
    reference = loss_and_grads(tuner, tokens, mask)
    assert not calls
    line = install_fused_path(tuner.model, kernels=KERNELS)
    assert "MambaInnerFn" in line, line
    fused = loss_and_grads(tuner, tokens, mask)
    assert len(calls) == len(mamba1_mixers(tuner.model)), "the fused path did not run"
    assert_close(*fused, *reference, context=f"batch seed {seed}")
    return line


class RecordBackward:
    """Records what MambaInnerFn.backward returns, and the shape of every matmul output of a backward pass."""

    def __init__(self, monkeypatch) -> None:
        self.returned: list[tuple] = []
        original = MambaInnerFn.backward

        def backward(ctx, *grads):
            result = original(ctx, *grads)
            self.returned.append(result)
            return result

        monkeypatch.setattr(MambaInnerFn, "backward", staticmethod(backward))

    class MatmulShapes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: set[tuple[int, ...]] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                self.shapes.add(tuple(out.shape))
            return out


@pytest.mark.parametrize("arch", ["mamba", "jamba"])
@pytest.mark.parametrize("method", list(METHODS))
def test_fused_path_matches_transformers_path(load_base, arch, method, monkeypatch):
    tuner = training_tuner(load_base(arch), method)
    mixers = mamba1_mixers(tuner.model)
    line = compare_paths(tuner, monkeypatch)
    assert f"{len(mixers)} {'Jamba' if arch == 'jamba' else ''}MambaMixers" in line

    # the coverage guard passes on the fused path, and no frozen big weight's gradient is ever formed
    recorder = RecordBackward(monkeypatch)
    tokens, _ = fresh_batch()
    tuner.model.zero_grad(set_to_none=True)
    loss = tuner.model(input_ids=tokens, labels=tokens).loss
    shapes = RecordBackward.MatmulShapes()
    with shapes:
        loss.backward()
    tuner.check_gradients()
    assert len(recorder.returned) == len(mixers)
    out_weight_grad = recorder.returned[0][8]
    if method == "full":
        assert out_weight_grad is not None
    else:
        assert out_weight_grad is None, "a frozen out_proj got a full weight gradient"
        big = {tuple(getattr(m, n).weight.shape) for _, m in mixers for n in ("in_proj", "out_proj")}
        assert not big & shapes.shapes, f"a matmul of a big weight's shape ran in backward: {big & shapes.shapes}"


@pytest.mark.parametrize("arch", ["mamba", "jamba"])
def test_padding_mask_is_applied_as_on_transformers_path(load_base, arch, monkeypatch):
    """Left padding, where masking after the conv matters for the real tokens."""
    tuner = training_tuner(load_base(arch), "sdlora")
    tokens, _ = fresh_batch()
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    mask[2, :1] = 0
    compare_paths(tuner, monkeypatch, mask=mask, tokens=tokens)


def test_sdt_warmup_phase_runs_fused(load_base, monkeypatch):
    """Warmup: a dense fp32 delta on A_log next to LoRA on out_proj."""
    model = load_base("mamba")
    tuner = sdt.apply(model, METHODS["sdlora"])
    assert tuner.phase == "warmup"
    with torch.no_grad():
        for p in tuner.trainable_parameters():
            p.normal_(0, 0.05)
    line = compare_paths(tuner, monkeypatch)
    assert "A_log=DenseDelta" in line and "out_proj=lora r8" in line


class ScaledLowRankDelta(P.LowRankDelta):
    """A LoRA variant the fused path does not know: it must fall back to the effective weight's gradient."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (2.0 * self.scaling * (self.lora_B @ self.lora_A)).to(weight.dtype)


def test_unknown_lora_variant_trains_through_its_weight_gradient(load_base, monkeypatch, caplog):
    tuner = training_tuner(load_base("mamba"), "lora")
    for _, mixer in mamba1_mixers(tuner.model):
        original = mixer.out_proj.parametrizations.weight[0]
        variant = ScaledLowRankDelta(mixer.out_proj.parametrizations.weight.original, 8, 1.0, torch.Generator())
        variant.load_state_dict(original.state_dict())
        mixer.out_proj.parametrizations.weight[0] = variant
    line = compare_paths(tuner, monkeypatch)
    assert "out_proj=weight-grad (ScaledLowRankDelta)" in line and "unrecognised adapters on out_proj" in line
    recorder = RecordBackward(monkeypatch)
    tokens, _ = fresh_batch()
    tuner.model(input_ids=tokens, labels=tokens).loss.backward()
    assert recorder.returned[0][8] is not None and recorder.returned[0][10] is None


def test_eval_and_generation_run_transformers_forward(load_base, monkeypatch):
    tuner = training_tuner(load_base("mamba"), "sdlora")
    install_fused_path(tuner.model, kernels=KERNELS)
    calls = []
    monkeypatch.setattr(MambaInnerFn, "apply", lambda *args: calls.append(1))
    tokens, _ = fresh_batch()
    tuner.model.eval()
    with torch.no_grad():
        tuner.model(input_ids=tokens)
        tuner.model.generate(tokens[:1], max_new_tokens=3, do_sample=False)
    assert not calls


def test_install_without_kernels_keeps_transformers_path_and_says_so(load_base):
    model = load_base("mamba")
    sdt.apply(model, METHODS["lora"])
    logged = []
    line = install_fused_path(model, log=logged.append)
    assert logged == [line] and line.startswith("fused path: off (no CUDA device)")
    assert all("forward" not in m.__dict__ for _, m in mamba1_mixers(model))
    with pytest.raises(TypeError, match="cannot run Mamba2Mixers"):
        install_fused_path(load_base("mamba2"), kernels=KERNELS)


def test_merge_after_uninstall_gives_the_same_logits(load_base):
    tuner = training_tuner(load_base("jamba"), "sdlora")
    install_fused_path(tuner.model, kernels=KERNELS)
    tokens, _ = fresh_batch()
    tuner.model.eval()
    with torch.no_grad():
        before = tuner.model(input_ids=tokens).logits
    uninstall_fused_path(tuner.model)
    merged = tuner.merge()
    with torch.no_grad():
        after = merged(input_ids=tokens).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert all("forward" not in m.__dict__ for _, m in mamba1_mixers(merged))


def test_a_fresh_cache_gets_the_states_transformers_records(load_base, monkeypatch):
    """Jamba builds a cache in every forward (its config's use_cache), training included: the fused path takes
    such a forward (the cache holds no state yet) and records the same conv and SSM states in it."""
    tuner = training_tuner(load_base("jamba"), "sdlora")
    tuner.model.train()
    tokens, _ = fresh_batch()
    states = []
    for install in (False, True):
        if install:
            install_fused_path(tuner.model, kernels=KERNELS)
        calls = count_fused_calls(monkeypatch)
        cache = DynamicCache(config=tuner.model.config)
        tuner.model(input_ids=tokens, past_key_values=cache, use_cache=True)  # 5.24 calls it `cache`, 5.17 not
        assert len(calls) == (len(mamba1_mixers(tuner.model)) if install else 0)
        layers = [i for i, layer in enumerate(cache.layers) if hasattr(layer, "conv_states")]
        states.append([(cache.layers[i].conv_states[0], cache.layers[i].recurrent_states[0]) for i in layers])
    for (conv, ssm), (conv_ref, ssm_ref) in zip(states[1], states[0]):
        torch.testing.assert_close(conv, conv_ref)
        torch.testing.assert_close(ssm.to(ssm_ref.dtype), ssm_ref, rtol=1e-5, atol=1e-6)


def test_a_model_off_the_kernels_device_runs_transformers_forward(load_base, monkeypatch):
    """Installed while the model is elsewhere (e.g. adapters attached before .cuda()): the forward checks the
    device at every call."""
    tuner = training_tuner(load_base("mamba"), "lora")

    class CudaOnly(ReferenceKernels):
        device_type = "cuda"

    line = install_fused_path(tuner.model, kernels=CudaOnly())
    assert "the model is on cpu now: it takes the path once on cuda" in line
    calls = count_fused_calls(monkeypatch)
    tokens, _ = fresh_batch()
    loss_and_grads(tuner, tokens)
    assert not calls
