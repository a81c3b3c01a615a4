"""Does SDT on a hybrid's Mamba-2 layers help beside LoRA on its attention and MLP? The hybrid preset against LoRA on
attention and MLP only, at equal trainable parameters, on a tiny Bamba.

    nice -n 10 python bench/paper/hybrid_learning.py              # 3 seeds
    nice -n 10 python bench/paper/hybrid_learning.py --quick      # smoke run: one seed, short training

Task: the one of docs/mamba2.md's head-rule experiment (``mamba2_head_rule.py``), on a hybrid. A random 3-layer
``BambaForCausalLM`` (hidden 64; Mamba-2 layers 0 and 2 of 32 heads of 4 channels, state 16, one group; attention at
layer 1; an MLP of 128 in every layer) is pretrained by next-pixel modelling of the digits training images (150
AdamW steps of 16 images), then fine-tuned on the same images read column by column: the order of the pixels
changes, so the model's dynamics have to. Metric: next-pixel cross-entropy on the transposed validation images after
training (nats per pixel, lower is better).

Arms, per seed on the same base:

* ``hybrid``: sdt's hybrid preset (``sdlora``, default counts): SDT on the Mamba-2 layers and LoRA on their
  out_proj, on attention (q, k, v, o) and on the MLPs (gate, up, down); a 20-step warmup, then the selection;
* ``attention+mlp``: the ``lora`` method with the Mamba-2 layers frozen and LoRA on attention and MLP.

Equal budgets: the two LoRA ranks (alpha = rank; the hybrid's up to 8) whose trainable counts (``sdt.plan``) differ
least; the ``lora_rank`` and ``trainable`` columns.

Both then train 100 AdamW steps of 8 images at lr 5e-3. Writes ``<name>.csv`` to ``--out``. Results: docs/hybrids.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from common import write_csv
from mamba2_head_rule import fit, loss_on, pretrained_on_digits, transposed
from transformers import BambaConfig, BambaForCausalLM

import sdt
from pipeline.tasks.digits import digits_pixel_sequences, digits_tokenizer

LAYERS = {"attention_lora_targets": ["q", "k", "v", "o"], "mlp_lora_targets": ["gate", "up", "down"]}


def base_model(seed: int, steps: int) -> BambaForCausalLM:
    """A random tiny Bamba pretrained by next-pixel modelling of the digits training images (row by row)."""
    eos = digits_tokenizer().eos_token_id
    config = BambaConfig(
        vocab_size=len(digits_tokenizer()),
        hidden_size=64,
        num_hidden_layers=3,
        attn_layer_indices=[1],
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=32,
        mamba_d_head=4,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_expand=2,
        mamba_chunk_size=16,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return pretrained_on_digits(BambaForCausalLM, config, seed, steps)


def configs(base, warmup_steps: int) -> dict[str, sdt.SDTConfig]:
    """The two arms at the pair of LoRA ranks (up to 8 for the hybrid) whose trainable counts differ least."""

    def hybrid(rank: int) -> sdt.SDTConfig:
        return sdt.SDTConfig.preset("sdlora", warmup_steps=warmup_steps, lora_rank=rank, lora_alpha=float(rank))

    def baseline(rank: int) -> sdt.SDTConfig:
        return sdt.SDTConfig.preset("lora", lora_targets=[], lora_rank=rank, lora_alpha=float(rank), **LAYERS)

    def count(config: sdt.SDTConfig) -> int:
        return sdt.plan(base, config).trainable[0]  # one group: the count is exact before the warmup

    pairs = [(h, b) for h in range(1, 9) for b in range(1, 17)]
    gap = {(h, b): abs(count(baseline(b)) / count(hybrid(h)) - 1) for h, b in pairs}
    h, b = min(pairs, key=gap.__getitem__)
    return {"hybrid": hybrid(h), "attention+mlp": baseline(b)}


def run(base, name: str, config: sdt.SDTConfig, data: dict, args) -> dict:
    student = copy.deepcopy(base)
    tuner = sdt.apply(student, config)
    if tuner.phase == "warmup":
        fit(student, tuner.trainable_parameters(), data["train"], args.warmup_steps, args.lr, args.batch, 1)
        tuner.start_training(tuner.select())
    fit(student, tuner.trainable_parameters(), data["train"], args.steps, args.lr, args.batch, 2, tuner.check_gradients)
    return {
        "arm": name,
        "lora_rank": config.lora_rank,
        "trainable": tuner.num_trainable_parameters(),
        "eval_loss": round(loss_on(student, data["validation"]), 5),
    }


def summary(rows: list[dict]) -> list[str]:
    """Each arm's mean ± sample std of eval_loss over seeds, and the hybrid's paired difference (negative: better)."""
    baseline = {r["seed"]: r["eval_loss"] for r in rows if r["arm"] == "attention+mlp"}
    lines = []
    for arm in ("hybrid", "attention+mlp"):
        losses = [r["eval_loss"] for r in rows if r["arm"] == arm]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        lines.append(f"{arm:14}: eval {statistics.mean(losses):.4f} ± {spread:.4f} over {len(losses)} seed(s)")
    differences = [r["eval_loss"] - baseline[r["seed"]] for r in rows if r["arm"] == "hybrid"]
    lines.append(f"hybrid - attention+mlp per seed: {', '.join(f'{d:+.4f}' for d in differences)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=150, help="batch 16")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100, help="training steps (after the hybrid's warmup)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, short training")
    parser.add_argument("--name", default="hybrid_learning", help="file name stem of the CSV")
    parser.add_argument("--out", type=Path, default=Path("bench/paper/results"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.name = [0], f"{args.name}_quick"
        args.pretrain_steps, args.warmup_steps, args.steps = 20, 3, 10
    torch.set_num_threads(1)  # a shared 2-core machine
    data = {
        "train": transposed(digits_pixel_sequences("train")),
        "validation": transposed(digits_pixel_sequences("validation")),
    }
    start, rows = time.perf_counter(), []
    for seed in args.seeds:
        base = base_model(seed, args.pretrain_steps)
        base_loss = round(loss_on(base, data["validation"]), 5)
        for name, config in configs(base, args.warmup_steps).items():
            rows.append({"seed": seed, "base_loss": base_loss, **run(base, name, config, data, args)})
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / f"{args.name}.csv")
    print("\n".join(summary(rows)))
    print(f"wall {time.perf_counter() - start:.0f}s; wrote {args.out / args.name}.csv")


if __name__ == "__main__":
    main()
