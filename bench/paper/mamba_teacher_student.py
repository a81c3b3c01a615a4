"""Mamba-1 analogue of the S4 synthetic experiment, run through sdtune's own ``sdt`` package
(docs/paper-reproduction.md, part 2).

    nice -n 19 python bench/paper/mamba_teacher_student.py                  # main run (batch 8 x 64, 200 steps)
    nice -n 19 python bench/paper/mamba_teacher_student.py --methods lora sdlora --lr 1e-2 \
        --name mamba_teacher_student_lr1e-2                                  # learning-rate check (also 2e-3)
    nice -n 19 python bench/paper/mamba_teacher_student.py --quick          # 1-2 minute smoke run

A frozen random 4-layer ``MambaForCausalLM`` (D=64, E=128, N=16, vocabulary 32, embedding frozen) learns to imitate
a random 1-layer Mamba target (N=8) that shares its embedding and tied head: MSE between the two models' logits on
fresh uniform random tokens every iteration, the same stream for every method. The metric is the MSE on a fixed
held-out set of random tokens after the last step (``eval_mse``); the S4 experiment's minimum training MSE over the
iterations is reported as well (``best_mse``), but with batches this small it is biased low by batch noise.

Methods, each built with ``sdt.apply`` and trained on ``tuner.trainable_parameters()``:
* ``sdlora``: SDT on A_log and the B/C columns of x_proj + LoRA on out_proj (``SDTConfig.preset("sdlora")`` with
  the counts as ints), a short warmup, then ``tuner.start_training(tuner.select())`` and a fresh optimizer;
* ``sdt``: the same without LoRA;
* ``lora``: LoRA on x_proj, dt_proj and out_proj (the paper's matched-budget baseline modules, docs/method.md §7);
* ``full``: every weight but the embedding; ``frozen``: nothing trained.
LoRA uses alpha = rank (scale 1), as the official baselines. Budgets are matched with
``tuner.num_trainable_parameters()``; the x axis is trainable / all parameters of the frozen model.

HF Mamba on CPU without mamba-ssm runs a per-token Python loop; ``MambaConfig(use_mambapy=True)`` with the
``mambapy`` package installed switches to its parallel scan, several times faster.
Writes ``<name>.csv`` and ``<name>.png`` to ``--out``. Results: docs/paper-reproduction.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import plot, write_csv
from transformers import MambaConfig, MambaForCausalLM

import sdt

HIDDEN, EXPAND, VOCAB = 64, 2, 32
INNER = EXPAND * HIDDEN
FROZEN_LAYERS, FROZEN_N = 4, 16
TARGET_LAYERS, TARGET_N = 1, 8
SEED = 123

# Trainable parameters per layer (x4 layers): lora 488 r (x_proj 164 r, dt_proj 132 r, out_proj 192 r);
# sdlora k_c k_s + 2 N k_c + 192 r; sdt k_c k_s + 2 N k_c. Three budgets: ~1.5%, ~2.9%, ~5.9% of 132,928.
SWEEP = [
    ("frozen", {}),
    *[("lora", {"r": r}) for r in (1, 2, 4)],
    *[("sdlora", {"k_c": c, "k_s": 4, "r": r}) for c, r in ((8, 1), (16, 2), (32, 4))],
    *[("sdt", {"k_c": c, "k_s": 4}) for c in (14, 28, 56)],
    ("full", {}),
]
QUICK_SWEEP = [
    ("frozen", {}),
    ("lora", {"r": 2}),
    ("sdlora", {"k_c": 16, "k_s": 4, "r": 2}),
    ("sdt", {"k_c": 28, "k_s": 4}),
    ("full", {}),
]
LABELS = {
    "frozen": "Frozen",
    "lora": "LoRA (x_proj, dt_proj, out_proj)",
    "sdt": "SDT",
    "sdlora": "SDLoRA (SDT + LoRA out_proj)",
    "full": "Full FT",
}


def random_mamba(layers: int, state: int) -> MambaForCausalLM:
    config = MambaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        expand=EXPAND,
        state_size=state,
        num_hidden_layers=layers,
        use_mambapy=True,
    )
    return MambaForCausalLM(config)


def sdt_config(method: str, cfg: dict, warmup_steps: int) -> sdt.SDTConfig:
    """The sdt preset of a sweep point; SDT counts given as ints (absolute frozen counts), as 0.99 of 128 channels
    would leave a single one."""
    counts = {}
    if method in ("sdt", "sdlora"):
        counts = {
            "channels_frozen": INNER - cfg["k_c"],
            "states_frozen": FROZEN_N - cfg["k_s"],
            "warmup_steps": warmup_steps,
        }
    if method == "lora":
        return sdt.SDTConfig.preset(
            "lora", lora_rank=cfg["r"], lora_alpha=float(cfg["r"]), lora_targets=("x_proj", "dt_proj", "out_proj")
        )
    if method == "sdlora":
        return sdt.SDTConfig.preset("sdlora", lora_rank=cfg["r"], lora_alpha=float(cfg["r"]), **counts)
    if method == "sdt":
        return sdt.SDTConfig.preset("sdt", **counts)
    return sdt.SDTConfig.preset("full")


def fit(model, params, target, steps: int, args, check=None) -> list[float]:
    """AdamW with torch defaults at a constant LR (the S4 protocol) on fresh random tokens; the MSE of every step.

    ``check`` runs after the first backward (the coverage guard); with no params the model is only evaluated.
    """
    optimizer = torch.optim.AdamW(params, lr=args.lr) if params else None
    generator = torch.Generator().manual_seed(SEED)  # the same token stream for every run and for warmup
    losses = []
    for step in range(steps):
        tokens = torch.randint(0, VOCAB, (args.batch, args.length), generator=generator)
        with torch.no_grad():
            wanted = target(input_ids=tokens, use_cache=False).logits
        with torch.set_grad_enabled(optimizer is not None):
            loss = F.mse_loss(model(input_ids=tokens, use_cache=False).logits, wanted)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0 and check is not None:
                check()
            optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model, target, args) -> float:
    """MSE on ``--eval-batches`` fixed batches drawn from their own seed, never trained on."""
    generator = torch.Generator().manual_seed(SEED + 1)
    losses = []
    for _ in range(args.eval_batches):
        tokens = torch.randint(0, VOCAB, (args.batch, args.length), generator=generator)
        losses.append(
            F.mse_loss(
                model(input_ids=tokens, use_cache=False).logits, target(input_ids=tokens, use_cache=False).logits
            ).item()
        )
    return sum(losses) / len(losses)


def run(method: str, cfg: dict, frozen: MambaForCausalLM, target: MambaForCausalLM, args):
    """One sweep point on a fresh copy of the frozen model: (trained model, trainable parameters, MSE per step)."""
    student = copy.deepcopy(frozen)
    if method == "frozen":
        return student, 0, fit(student, [], target, args.iterations, args)
    tuner = sdt.apply(student, sdt_config(method, cfg, args.warmup_steps))
    if tuner.phase == "warmup":
        fit(
            student,
            tuner.trainable_parameters(),
            target,
            args.warmup_steps,
            args,
            tuner.check_gradients,
        )
        tuner.start_training(tuner.select())  # base restored, fresh LoRA, sparse deltas; a new optimizer below
    if method == "full":
        student.backbone.embeddings.requires_grad_(False)  # frozen in every arm (and tied to the head)
    losses = fit(student, tuner.trainable_parameters(), target, args.iterations, args, tuner.check_gradients)
    return student, tuner.num_trainable_parameters(), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup-steps", type=int, default=20, help="SDT warmup, before the full run")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 methods, 30 iterations, batch 4 x 32")
    parser.add_argument("--methods", nargs="+", choices=list(LABELS), default=list(LABELS))
    parser.add_argument("--name", default="mamba_teacher_student", help="file name stem of the CSV and PNG")
    parser.add_argument("--out", type=Path, default=Path("bench/paper/results"))
    args = parser.parse_args()
    sweep = SWEEP
    if args.quick:
        args.iterations, args.warmup_steps, args.batch, args.length = 30, 5, 4, 32
        sweep, args.name = QUICK_SWEEP, f"{args.name}_quick"
    sweep = [(m, cfg) for m, cfg in sweep if m in args.methods]
    torch.set_num_threads(1)  # a shared 2-core machine

    start = time.perf_counter()
    torch.manual_seed(SEED)  # the target first, then the frozen model, as in the S4 experiment
    target = random_mamba(TARGET_LAYERS, TARGET_N)
    frozen = random_mamba(FROZEN_LAYERS, FROZEN_N)
    # Sharing the embedding (and so the tied head) leaves the mixers and norms as the only difference to learn.
    target.backbone.embeddings.weight.data.copy_(frozen.backbone.embeddings.weight.data)
    total = sum(p.numel() for p in frozen.parameters())

    rows = []
    for method, cfg in sweep:
        t0 = time.perf_counter()
        model, trainable, losses = run(method, cfg, frozen, target, args)
        rows.append(
            {
                "method": method,
                "config": " ".join(f"{k}={v}" for k, v in cfg.items()),
                "trainable": trainable,
                "pct_params": round(100 * trainable / total, 2),
                "untuned_mse": round(losses[0], 5),
                "eval_mse": round(evaluate(model, target, args), 5),
                "best_mse": round(min(losses), 5),
                "last_mse": round(losses[-1], 5),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / f"{args.name}.csv")
    plot(
        rows,
        args.out / f"{args.name}.png",
        LABELS,
        "Mamba-1: 4-layer random Mamba imitating a 1-layer target",
        metric="eval_mse",
    )
    print(
        f"frozen-model params {total}; batch {args.batch} x {args.length}; {args.iterations} iterations; "
        f"wall {time.perf_counter() - start:.0f}s; wrote {args.out / args.name}.csv/.png"
    )


if __name__ == "__main__":
    main()
