"""Batched generation (pipeline.tasks.decoding) against one prompt at a time: speed, how many outputs are identical,
and the task metric both ways.

    python bench/generation_speed.py --out generation.json              # mamba-130m shape, 64 prompts (GPU)
    python bench/generation_speed.py --quick --out /tmp/generation.json  # tiny shapes on the CPU: a smoke test

"One at a time" is ``generate(..., batch_size=1)``: each prompt decoded alone, without padding, which is what
``model.generate`` on that prompt does. "Batched" is ``generate(..., batch_size=--batch)``: ``--batch`` prompts (times
the beams) decode together, left-padded with the attention mask. Both greedy or beam search (``--beams``). Batched
decoding is exact in fp32: it gives every prompt the tokens it gets alone (tests/test_generation.py). In bf16 the
batch shape changes the kernels' rounding, so a near-tie between two next tokens can go the other way; this bench
measures how often that happens and what it does to a task's score.

1. **Speed**, on a model of mamba-130m's shape (``--hidden``, ``--layers``, vocab 50280) with random weights, bf16
   with A_log and D in fp32 (fp32 on the CPU, whose reference scan runs no such mix), on the mamba-ssm kernels (the
   bench refuses a fallback): ``--prompts`` prompts of random tokens with SAMSum's length profile
   (``--prompt-tokens`` ± 60), ``--new-tokens`` each. Every prompt is decoded both ways and each way is timed on all
   of them (the GPU waited for at the ends): seconds in all, seconds per prompt alone (median and quartiles) and per
   batch. No time is extrapolated. Then the share of the prompts whose outputs are token for token identical both
   ways. Random weights make next-token logits near ties, so this share is a worst case.
2. **Task metric both ways**, on a trained model: the built-in digits base (pipeline/tasks/digits_base, pretrained
   on next-pixel modelling) completing the first ``--completion-images`` test images: the first
   ``--completion-prefix`` of each image's 61 pixel tokens are the prompt, the rest the reference. Each way's
   completions are scored as ``pipeline.tasks.metrics.evaluate`` scores a generation task (ROUGE-L, ROUGE-1/2, BLEU,
   exact match); and the share of identical outputs. In bf16, and in fp32 as the control (identical by design;
   fp32 only on the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from rounds import header, spread, write_json

from pipeline.tasks.decoding import generate
from pipeline.tasks.metrics import _generation_scores as generation_scores

EOS = PAD = 0  # of the random-weight model; the digits base has its tokenizer's


def random_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import MambaConfig, MambaForCausalLM

    import sdt

    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        state_size=16,
        expand=2,
        tie_word_embeddings=True,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    with device:
        model = MambaForCausalLM(config)
    return sdt.to_compute_dtype(model, dtype).eval()


def random_prompts(args) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    spread_tokens = min(60, args.prompt_tokens - 1)
    low, high = args.prompt_tokens - spread_tokens, args.prompt_tokens + spread_tokens + 1
    lengths = torch.randint(low, high, (args.prompts,), generator=generator).tolist()
    return [torch.randint(1, args.vocab, (n,), generator=generator).tolist() for n in lengths]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_timed(model, prompts: list[list[int]], args, batch_size: int, device) -> tuple[list[list[int]], list[float]]:
    """Every prompt's tokens, ``batch_size`` prompts at a time; and the seconds each batch took."""

    outputs, seconds = [], []
    for start in range(0, len(prompts), batch_size):
        synchronize(device)
        began = time.perf_counter()
        outputs += generate(
            model,
            prompts[start : start + batch_size],
            max_new_tokens=args.new_tokens,
            num_beams=args.beams,
            eos_token_id=EOS,
            pad_token_id=PAD,
            batch_size=batch_size,
        )
        synchronize(device)
        seconds.append(time.perf_counter() - began)
    return outputs, seconds


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """The share of identical outputs, and where the others first differ (token index)."""
    firsts = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q))) for p, q in zip(a, b)]
    differing = [first for first, p, q in zip(firsts, a, b) if p != q]
    return {
        "identical": sum(p == q for p, q in zip(a, b)),
        "of": len(a),
        "identical_share": sum(p == q for p, q in zip(a, b)) / len(a),
        "first_difference_median": statistics.median(differing) if differing else None,
    }


def speed(args, device: torch.device, dtype: str) -> dict[str, Any]:
    """Part 1: both ways on every prompt, timed; their agreement."""

    model = random_model(args, device, getattr(torch, dtype))
    prompts = random_prompts(args)
    # kernels, allocator and generate's own first-call costs, on prompts of the timed lengths
    generate(
        model, prompts[:2], max_new_tokens=4, num_beams=args.beams, eos_token_id=EOS, pad_token_id=PAD, batch_size=2
    )
    alone, alone_s = decode_timed(model, prompts, args, 1, device)
    print(f"one at a time: {sum(alone_s):.1f} s for {len(prompts)} prompts", flush=True)
    together, batch_s = decode_timed(model, prompts, args, args.batch, device)
    print(f"batched: {sum(batch_s):.1f} s for {len(prompts)} prompts", flush=True)
    return {
        "prompts": len(prompts),
        "one_at_a_time_s": sum(alone_s),
        "one_at_a_time_s_per_prompt": spread(alone_s),
        "batched_s": sum(batch_s),
        "batched_s_per_batch": spread(batch_s),
        "speedup": sum(alone_s) / sum(batch_s),
        "dtype": dtype,
        "agreement": agreement(alone, together),
    }


def completion_examples(args, eos: int) -> tuple[list, int]:
    """The digits test images as a generation task: the first ``--completion-prefix`` pixels prompt the rest; and
    how many tokens that rest is."""
    from pipeline.tasks.digits import digits_pixel_sequences
    from pipeline.tasks.formatting import Example

    images = digits_pixel_sequences("test")[: args.completion_images]
    k = args.completion_prefix
    examples = [Example(image[:k], [*image[k:], eos], reference=" ".join(map(str, image[k:]))) for image in images]
    return examples, len(images[0]) - k


def task_metric(args, device: torch.device, dtype: str) -> dict[str, Any]:
    """Part 2 in ``dtype``: the completions decoded in batches of ``--batch`` and one at a time, their agreement, and
    each way's scores as sdtune's evaluation computes them for a generation task."""
    from pipeline.spec.job import ModelSpec
    from pipeline.trial.models import load_base_model

    model, tokenizer = load_base_model(ModelSpec(builtin="digits", dtype=dtype), device, log=lambda line: None)
    examples, new_tokens = completion_examples(args, tokenizer.eos_token_id)
    prompts, references = [e.prompt_ids for e in examples], [str(e.reference) for e in examples]
    eos = tokenizer.eos_token_id
    ways = {}
    began = time.perf_counter()
    for name, size in (("batched", args.batch), ("one_at_a_time", 1)):
        outputs = generate(
            model,
            prompts,
            max_new_tokens=new_tokens,
            num_beams=args.beams,
            eos_token_id=eos,
            pad_token_id=eos,
            batch_size=size,
        )
        # as pipeline.tasks.metrics.evaluate turns a generation into the text it scores
        predictions = [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in outputs]
        ways[name] = (outputs, generation_scores(predictions, references))
    print(f"{dtype}: {len(prompts)} completions both ways in {time.perf_counter() - began:.1f} s", flush=True)
    return {
        "images": len(prompts),
        "scores": {name: scores for name, (_, scores) in ways.items()},
        **agreement(ways["one_at_a_time"][0], ways["batched"][0]),
    }


def refuse_fallback(device: torch.device) -> None:
    """On CUDA, the mamba-ssm kernels or nothing: a bench of the reference path would time the wrong thing."""
    from pipeline.trial.models import kernel_paths

    paths = kernel_paths("mamba")
    if device.type == "cuda" and "pytorch" in paths.values():
        raise SystemExit(f"the mamba kernels are not all active ({paths}); refusing to time a fallback")


def print_results(result: dict[str, Any]) -> None:
    s, same = result["speed"], result["speed"]["agreement"]
    alone, batches = s["one_at_a_time_s_per_prompt"], s["batched_s_per_batch"]
    print(
        f"speed, {s['prompts']} prompts each way: one at a time {s['one_at_a_time_s']:.1f} s (per prompt: median "
        f"{alone['median']:.2f} s, quartiles {alone['q1']:.2f}-{alone['q3']:.2f} s), batched {s['batched_s']:.1f} s "
        f"({batches['n']} batches of up to {result['shape']['batch']}): {s['speedup']:.1f}x"
    )
    first = same["first_difference_median"]
    where = "" if first is None else f" (the others first differ at token {first}, median)"
    print(f"{s['dtype']}, random weights: {same['identical']} of {same['of']} outputs identical both ways{where}")
    for dtype, part in result["task_metric"].items():
        one, batched = part["scores"]["one_at_a_time"], part["scores"]["batched"]
        keys = ("rougeL", "exact_match", "bleu")
        both = ", ".join(f"{key} {batched[key]:.4f} / {one[key]:.4f}" for key in keys)
        print(
            f"{dtype}, digits base completing {part['images']} test images: {part['identical']} of {part['of']} "
            f"outputs identical; batched / one at a time: {both}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--prompts", type=int, default=64, help="prompts decoded each way (part 1)")
    parser.add_argument("--prompt-tokens", type=int, default=400, help="mean prompt length (part 1)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (part 1)")
    parser.add_argument("--beams", type=int, default=5, help="1: greedy")
    parser.add_argument("--batch", type=int, default=32, help="prompts decoded together")
    parser.add_argument("--completion-images", type=int, default=128, help="digits test images (part 2; 297 in all)")
    parser.add_argument("--completion-prefix", type=int, default=30, help="pixels of each image in its prompt")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", help="write the results here (JSON)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.prompts, args.prompt_tokens = 64, 2, 1024, 8, 30
        args.new_tokens, args.beams, args.batch, args.completion_images = 8, 2, 4, 16
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    refuse_fallback(device)
    generation_scores(["1 2"], ["1 2"])  # part 2's scorers (rouge-score, sacrebleu) load: fail before part 1's minutes
    shape = {
        key: getattr(args, key)
        for key in ("hidden", "layers", "vocab", "prompt_tokens", "new_tokens", "beams", "batch", "completion_prefix")
    }
    # transformers' reference scan (the CPU's) cannot run a bf16 model whose A_log stays fp32: fp32 there
    dtypes = ("bfloat16", "float32") if device.type == "cuda" else ("float32",)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": shape,
        "speed": speed(args, device, dtypes[0]),
    }
    if args.out:  # part 1 kept should part 2 not finish
        write_json(args.out, {**header("generation_speed"), **result})
    result["task_metric"] = {dtype: task_metric(args, device, dtype) for dtype in dtypes}
    print_results(result)
    if args.out:
        write_json(args.out, {**header("generation_speed"), **result})


if __name__ == "__main__":
    main()
