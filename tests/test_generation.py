"""Batched generation is exact in fp32: greedy decoding and beam search of prompts of different lengths, batched and
left-padded, give every prompt the tokens that transformers' own ``generate`` gives it alone, token for token; on
the CPU (tiny Mamba, Mamba-2 and Jamba) and, marked ``cuda``, on the mamba-ssm / causal-conv1d kernels.

Exact means token-identical, not bit-identical: the two runs compute the same function, but a padded batch sums in
another order than one prompt does, so their logits differ by float rounding (at most 6e-7 on these CPU models,
whose logits have a standard deviation of 0.07 to 0.5). The models are random and untouched (no sharpened logits):
a choice between two tokens that rounding could flip would show here as a failure, not be hidden."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, kernel_jamba_config, kernel_mamba2_config
from transformers import JambaForCausalLM, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

import sdt
from pipeline.compat.transformers import kernel_implementation
from pipeline.tasks.decoding import batches, generate

EOS = PAD = VOCAB - 1
LENGTHS = [3, 11, 6, 1, 9, 6, 14]


def prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 1, (n,), generator=generator).tolist() for n in lengths]


def alone(model, prompt: list[int], num_beams: int, max_new_tokens: int, eos: int) -> list[int]:
    """transformers' generate on one prompt, cut after its first eos, as the batched path returns it."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, num_beams=num_beams,
        do_sample=False, eos_token_id=eos, pad_token_id=eos,
    )[0, len(prompt):].tolist()  # fmt: skip
    return out[: out.index(eos) + 1] if eos in out else out


def assert_batched_equals_alone(model, lengths: list[int], vocab: int, num_beams: int, batch_size: int) -> None:
    eos, max_new_tokens = vocab - 1, 12
    inputs = prompts(lengths, vocab)
    expected = [alone(model, p, num_beams, max_new_tokens, eos) for p in inputs]
    got = generate(model, inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, eos_token_id=eos,
                   pad_token_id=eos, batch_size=batch_size)  # fmt: skip
    differ = [(len(inputs[i]), got[i], expected[i]) for i in range(len(inputs)) if got[i] != expected[i]]
    assert not differ, f"(prompt length, batched, alone): {differ}"
    # Different continuations, so that a batch whose rows leaked into each other could not pass.
    assert len({tuple(tokens) for tokens in got}) > len(inputs) // 2


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("arch", ["mamba", "mamba2", "jamba"])
def test_batched_generation_is_exact_in_fp32(load_base, arch, num_beams):
    assert_batched_equals_alone(load_base(arch).eval(), LENGTHS, VOCAB, num_beams, batch_size=4)


def state_tuned(model, method: str):
    """``model`` with the state method's tensors set away from their zero start (zero would leave the base)."""
    tuner = sdt.apply(model, sdt.SDTConfig.preset(method))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuner.trainable_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    return tuner.model.eval()


@pytest.mark.parametrize("method", ["state-offset", "initial-state"])
@pytest.mark.parametrize("arch", ["mamba", "mamba2", "jamba"])
def test_batched_generation_with_a_state_method_is_exact_in_fp32(load_base, arch, method):
    """Every left-padded prompt starts from the initial state at its own first token, and the offset joins every
    decoding step: batched greedy decoding and beam search give each prompt the tokens it gets alone."""
    model = state_tuned(load_base(arch), method)
    assert_batched_equals_alone(model, LENGTHS, VOCAB, num_beams=1, batch_size=4)
    assert_batched_equals_alone(model, LENGTHS[:4], VOCAB, num_beams=3, batch_size=2)


@pytest.mark.parametrize("method", ["state-offset", "initial-state"])
@pytest.mark.parametrize("arch", ["mamba", "mamba2", "jamba"])
def test_left_padding_leaves_a_prompts_logits_as_alone(load_base, arch, method):
    """Tokens are a coarse check (a random tiny model rarely flips a choice): the logits of a left-padded prompt are
    those it gets alone, where a state decayed over the pads would move them by its decay."""
    model = state_tuned(load_base(arch), method)
    short, long = prompts([4, 9], VOCAB, seed=5)
    ids = torch.tensor([[PAD] * 5 + short, long])
    mask = torch.tensor([[0] * 5 + [1] * 4, [1] * 9])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[0, 5:]
        alone_logits = model(input_ids=torch.tensor([short])).logits[0]
    torch.testing.assert_close(padded, alone_logits, rtol=1e-5, atol=1e-5)  # fp32 rounding, as above


@pytest.mark.parametrize("method", ["state-offset", "initial-state"])
@pytest.mark.parametrize("arch", ["mamba", "mamba2", "jamba"])
def test_each_decoding_step_gives_the_logits_of_the_whole_sequence(load_base, arch, method):
    """A step from the cached state (conv inputs and SSM state kept by the prompt's forward) computes what a forward
    of the whole sequence from no state computes at that position."""
    model = state_tuned(load_base(arch), method)
    prompt = torch.tensor(prompts([5], VOCAB, seed=3))
    out = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
        output_logits=True, return_dict_in_generate=True, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    with torch.no_grad():
        whole = model(input_ids=out.sequences).logits
    for step, logits in enumerate(out.logits):
        # fp32, one function summed in two orders (a step against the whole scan): rounding, ~1e-6
        torch.testing.assert_close(logits, whole[:, prompt.shape[1] - 1 + step], rtol=1e-5, atol=1e-5)


def test_batches_go_longest_first_and_keep_lengths_apart_when_padding_is_not_exact():
    lengths = [[0] * n for n in (3, 5, 5, 2, 5)]
    assert batches(lengths, 2, mixed_lengths=True) == [[1, 2], [4, 0], [3]]
    assert batches(lengths, 2, mixed_lengths=False) == [[1, 2], [4], [0], [3]]


CUDA_VOCAB = 512
# Shapes the kernels take; Mamba-2's chunk of 64 tokens is shorter than the longest prompts, so a padded prompt's
# scan crosses chunks at other positions than it does alone.
CUDA_MODELS = {
    "mamba": (
        MambaForCausalLM,
        MambaConfig(vocab_size=CUDA_VOCAB, hidden_size=256, num_hidden_layers=2, state_size=16),
    ),
    "mamba2": (Mamba2ForCausalLM, kernel_mamba2_config(CUDA_VOCAB)),
    "jamba": (JambaForCausalLM, kernel_jamba_config(CUDA_VOCAB)),
}
# The prompt's pass (a scan over it) and the decode step (one token on the cached state), per architecture.
CUDA_KERNELS = {
    "mamba": ("mamba_selective_scan", "mamba_selective_state_update", "causal_conv1d_fn", "causal_conv1d_update"),
    "mamba2": ("mamba2_chunk_scan", "mamba2_selective_state_update", "causal_conv1d_fn", "causal_conv1d_update"),
    "jamba": ("mamba_selective_scan", "mamba_selective_state_update", "causal_conv1d_fn", "causal_conv1d_update"),
}
CUDA_LENGTHS = [5, 90, 37, 1, 130, 64, 23, 9]


@pytest.mark.cuda
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("arch", list(CUDA_MODELS))
def test_batched_generation_is_exact_in_fp32_on_the_cuda_kernels(arch, num_beams):
    paths = {name: kernel_implementation(arch, name).__module__.split(".")[0] for name in CUDA_KERNELS[arch]}
    assert set(paths.values()) <= {"mamba_ssm", "causal_conv1d"}, paths  # not transformers' PyTorch fallback
    model_class, config = CUDA_MODELS[arch]
    torch.manual_seed(0)
    model = model_class(config).float().cuda().eval()
    assert_batched_equals_alone(model, CUDA_LENGTHS, CUDA_VOCAB, num_beams, batch_size=3)
