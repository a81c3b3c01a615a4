"""Generation eval speed: batched exact generation (pipeline.tasks.decoding) against one prompt at a time, and whether
their tokens agree.

    python bench/generation_speed.py --out generation.json       # 1.4b shape, 200 SAMSum-shaped prompts, 5 beams

Random-initialised Mamba of the given shape in bf16 (A_log and D fp32) on CUDA, prompts of random tokens with
SAMSum's length profile (about 400 tokens), ``--new-tokens`` tokens each. One prompt at a time is timed on the first
``--alone`` prompts and extrapolated to all of them; the batched path decodes all of them. Then the agreement of
the two on those prompts is printed (a random-init model's logits are near ties, so bf16 can flip a token where
the batch shapes change the kernels' rounding), and an fp32 check on a smaller model, where ties are rarer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import MambaConfig, MambaForCausalLM

import sdt
from pipeline.tasks.decoding import generate

EOS = PAD = 0


def build(hidden: int, layers: int, vocab: int, dtype: torch.dtype) -> MambaForCausalLM:
    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        state_size=16,
        expand=2,
        tie_word_embeddings=True,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    with torch.device("cuda"):
        model = MambaForCausalLM(config)
    return sdt.to_compute_dtype(model, dtype).eval()


def prompts(count: int, mean: int, spread: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(mean - spread, mean + spread + 1, (count,), generator=generator).tolist()
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


def one_at_a_time(model, prompt: list[int], new_tokens: int, beams: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        num_beams=beams,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )[0, len(prompt) :].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


def timed(action):
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = action()
    torch.cuda.synchronize()
    return value, time.perf_counter() - start


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--batch", type=int, default=50, help="prompts decoded together")
    parser.add_argument("--alone", type=int, default=6, help="prompts timed one at a time")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model = build(args.hidden, args.layers, args.vocab, torch.bfloat16)
    batch = prompts(args.prompts, args.prompt_tokens, 60, args.vocab, seed=0)
    # warm-up: kernels, allocator
    generate(model, batch[:2], max_new_tokens=4, num_beams=args.beams, eos_token_id=EOS, pad_token_id=PAD, batch_size=2)
    alone, alone_s = timed(lambda: [one_at_a_time(model, p, args.new_tokens, args.beams) for p in batch[: args.alone]])
    together, together_s = timed(
        lambda: generate(
            model,
            batch,
            max_new_tokens=args.new_tokens,
            num_beams=args.beams,
            eos_token_id=EOS,
            pad_token_id=PAD,
            batch_size=args.batch,
        )
    )
    per_prompt_alone = alone_s / args.alone
    result = {
        "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "beams": args.beams,
        "batch": args.batch,
        "alone_s_per_prompt": per_prompt_alone,
        "alone_s_extrapolated": per_prompt_alone * args.prompts,
        "batched_s": together_s,
        "speedup": per_prompt_alone * args.prompts / together_s,
        "bf16_agreement": agreement(alone, together[: args.alone]),
    }
    model = None  # its memory, for the fp32 check below
    # fp32, a smaller model: greedy and beams, one at a time against batched, token for token.
    small = build(768, 4, 1024, torch.float32)
    checks = prompts(16, 100, 60, 1024, seed=1)
    for beams in (1, args.beams):
        expected = [one_at_a_time(small, p, 32, beams) for p in checks]
        got = generate(
            small, checks, max_new_tokens=32, num_beams=beams, eos_token_id=EOS, pad_token_id=PAD, batch_size=8
        )
        result[f"fp32_agreement_beams{beams}"] = agreement(expected, got)
    print(json.dumps(result, indent=2))
    print(
        f"\n{args.prompts} prompts x {args.new_tokens} tokens, {args.beams} beams,"
        f" hidden {args.hidden} x {args.layers}:"
        f" one at a time {per_prompt_alone:.2f} s/prompt (~{per_prompt_alone * args.prompts:.0f} s for all),"
        f" batched {together_s:.1f} s: {result['speedup']:.1f}x"
    )
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
