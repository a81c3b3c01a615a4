"""How many heads should Mamba-2's default SDT train? Three rules compared at equal trainable parameters.

    nice -n 10 python bench/paper/mamba2_head_rule.py              # main run: SDT, 3 seeds x n_groups 1 and 4
    nice -n 10 python bench/paper/mamba2_head_rule.py --methods sdlora --groups 4 \
        --name mamba2_head_rule_sdlora                             # the same with LoRA r2 on out_proj
    nice -n 10 python bench/paper/mamba2_head_rule.py --quick      # smoke run: one seed, short training

The paper's default freezes 99% of the channels (docs/method.md §4); on Mamba-2, where heads play channels
(docs/method.md §6), that trains no head of a checkpoint with up to 50 heads a layer and one head of one with 51
to 150. The rules, each at least one head:

* ``one``: the paper's fraction, rounded as the official code does, at least one: 1 head up to 150 heads;
* ``sixteenth``: ceil(heads / 16): 1 of 8, 2 of 24, 4 of 64, 8 of 128;
* ``all``: every head (A_log is one scalar per head, so heads are cheap; but B/C rows train in every group that
  holds a selected head, so with several groups the budget spreads over them).

Task: a pretrained base adapting to a new domain. A random 2-layer ``Mamba2ForCausalLM`` (hidden 64, 64 heads of
2 channels, state 16, n_groups 1 or 4) is pretrained by next-pixel modelling of the digits training images
(:func:`pipeline.tasks.digits.digits_pixel_sequences`, 150 AdamW steps of 16 images), then fine-tuned on the same images
*transposed* (read column by column): the order of the pixels changes, so the SSM's dynamics have to. Metric:
next-pixel cross-entropy on the transposed validation images after training (``eval_loss``; the base's is
``base_loss``).

Every run: ``sdt.apply`` with the counts given as ints, a 20-step warmup (shared by the three rules of one seed,
n_groups and method: the selection's counts act after it), ``sdt.select`` with the rule's head count, then 100
AdamW steps of 8 images at lr 5e-3 on the selected entries. Equal budgets: each rule trains 4 of the 16 B/C rows
per selected group and as many hidden inputs per row as make its SDT parameters (heads + B/C entries) equal to
those of ``one`` with 32 of the 64 inputs, within rounding (the ``sdt_parameters`` column). ``sdlora`` adds LoRA
r=2 on out_proj, the same for every rule.

Writes ``<name>.csv`` to ``--out``. Results: docs/mamba2.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import write_csv
from transformers import Mamba2Config, Mamba2ForCausalLM

import sdt
from pipeline.tasks.digits import BLANK_PIXELS, digits_pixel_sequences, digits_tokenizer

HIDDEN, HEADS, STATES, LAYERS = 64, 64, 16, 2
TRAINED_STATES, BUDGET_INPUTS = 4, 32  # rule `one`'s B/C rows and inputs per row: the budget every rule matches
RULES: dict[str, Callable[[int], int]] = {
    "one": lambda heads: max(1, sdt.trainable_count(0.99, heads)),
    "sixteenth": lambda heads: math.ceil(heads / 16),
    "all": lambda heads: heads,
}


def transposed(sequences: list[list[int]]) -> torch.Tensor:
    """Each image's pixels read column by column instead of row by row (the blank pixels left out again)."""
    side = 8
    images = []
    for sequence in sequences:
        pixels = iter(sequence)
        full = [0 if i in BLANK_PIXELS else next(pixels) for i in range(side * side)]
        by_column = [full[(i % side) * side + i // side] for i in range(side * side)]
        images.append([value for i, value in enumerate(by_column) if i not in BLANK_PIXELS])
    return torch.tensor(images)


def base_model(groups: int, seed: int, steps: int) -> Mamba2ForCausalLM:
    """A random Mamba-2 pretrained by next-pixel modelling of the digits training images (row by row)."""
    eos = digits_tokenizer().eos_token_id
    config = Mamba2Config(
        vocab_size=len(digits_tokenizer()),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        state_size=STATES,
        num_heads=HEADS,
        head_dim=2 * HIDDEN // HEADS,
        n_groups=groups,
        expand=2,
        chunk_size=16,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return pretrained_on_digits(Mamba2ForCausalLM, config, seed, steps)


def pretrained_on_digits(model_class, config, seed: int, steps: int):
    """A ``model_class`` of ``config`` from seed ``seed``, trained ``steps`` steps on next-pixel modelling of the
    digits' training images: the experiments' pretrained base."""
    torch.manual_seed(seed)
    model = model_class(config)
    fit(model, list(model.parameters()), torch.tensor(digits_pixel_sequences("train")), steps, 5e-3, 16, seed)
    return model


def fit(model, params, data: torch.Tensor, steps: int, lr: float, batch: int, seed: int, check=None) -> None:
    """AdamW (torch defaults, constant lr, gradient clipping at 1) on random batches of ``data``; ``check`` runs
    after the first backward (the coverage guard)."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        tokens = data[torch.randint(0, len(data), (batch,), generator=generator)]
        model(input_ids=tokens, labels=tokens).loss.backward()
        if step == 0 and check is not None:
            check()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def loss_on(model, data: torch.Tensor) -> float:
    model.eval()
    return model(input_ids=data, labels=data).loss.item()


def config(method: str, heads: int, inputs: int, warmup_steps: int) -> sdt.SDTConfig:
    lora = {"lora_rank": 2, "lora_alpha": 2.0} if method == "sdlora" else {}
    return sdt.SDTConfig.preset(
        method,
        channels_frozen=HEADS - heads,
        states_frozen=STATES - TRAINED_STATES,
        inputs_frozen=HIDDEN - inputs,
        warmup_steps=warmup_steps,
        **lora,
    )


def equal_budget_selection(base, method: str, heads: int, updates: dict, warmup_steps: int):
    """The rule's selection with the inputs per B/C row that match rule ``one``'s SDT budget: (config, selection)."""
    budget = LAYERS * (1 + 2 * TRAINED_STATES * BUDGET_INPUTS)
    provisional = config(method, heads, BUDGET_INPUTS, warmup_steps)
    groups = sum(len(layer["groups"]) for layer in sdt.select(base, provisional, updates).values())
    inputs = min(HIDDEN, max(1, round((budget - LAYERS * heads) / (2 * TRAINED_STATES * groups))))
    final = config(method, heads, inputs, warmup_steps)
    return final, sdt.select(base, final, updates)


def runs_for(base, method: str, data: dict, args) -> list[dict]:
    """One warmup for ``method`` on ``base``, then every rule's training from the same warmup updates."""
    student = copy.deepcopy(base)
    tuner = sdt.apply(student, config(method, 1, BUDGET_INPUTS, args.warmup_steps))
    fit(student, tuner.trainable_parameters(), data["train"], args.warmup_steps, args.lr, args.batch, 1)
    updates = tuner.warmup_updates()
    rows = []
    for rule, heads_of in RULES.items():
        heads = heads_of(HEADS)
        cfg, selection = equal_budget_selection(base, method, heads, updates, args.warmup_steps)
        student = copy.deepcopy(base)
        tuner = sdt.Tuner(student, cfg, selection=selection)
        params = tuner.trainable_parameters()
        fit(student, params, data["train"], args.steps, args.lr, args.batch, 2, tuner.check_gradients)
        sdt_parameters = sum(p.numel() for name, p in tuner.named_trainable_parameters() if "lora" not in name)
        rows.append(
            {
                "method": method,
                "rule": rule,
                "heads": heads,
                "groups_trained": sum(len(layer["groups"]) for layer in selection.values()),
                "inputs_per_row": HIDDEN - cfg.inputs_frozen,
                "sdt_parameters": sdt_parameters,
                "trainable": tuner.num_trainable_parameters(),
                "eval_loss": round(loss_on(student, data["validation"]), 5),
            }
        )
    return rows


def summary(rows: list[dict]) -> list[str]:
    """Per n_groups and method: each rule's mean ± sample std of eval_loss over seeds, and its mean paired
    difference to ``one`` (negative: better than ``one``)."""
    lines = []
    keys = sorted({(r["n_groups"], r["method"]) for r in rows})
    for groups, method in keys:
        cell = [r for r in rows if r["n_groups"] == groups and r["method"] == method]
        one = {r["seed"]: r["eval_loss"] for r in cell if r["rule"] == "one"}
        for rule in RULES:
            losses = [r["eval_loss"] for r in cell if r["rule"] == rule]
            differences = [r["eval_loss"] - one[r["seed"]] for r in cell if r["rule"] == rule]
            spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
            lines.append(
                f"n_groups {groups} {method:6} {rule:9}: eval {statistics.mean(losses):.4f} ± {spread:.4f}, "
                f"vs one {statistics.mean(differences):+.4f} (per seed {', '.join(f'{d:+.4f}' for d in differences)})"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4], help="n_groups of the base")
    parser.add_argument("--methods", nargs="+", choices=["sdt", "sdlora"], default=["sdt"])
    parser.add_argument("--pretrain-steps", type=int, default=150, help="batch 16")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100, help="training steps after the warmup")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--quick", action="store_true", help="smoke run: one seed, n_groups 4, sdt, short")
    parser.add_argument("--name", default="mamba2_head_rule", help="file name stem of the CSV")
    parser.add_argument("--out", type=Path, default=Path("bench/paper/results"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.groups, args.methods, args.name = [0], [4], ["sdt"], f"{args.name}_quick"
        args.pretrain_steps, args.warmup_steps, args.steps = 30, 5, 20
    torch.set_num_threads(1)  # a shared 2-core machine
    data = {
        "train": transposed(digits_pixel_sequences("train")),
        "validation": transposed(digits_pixel_sequences("validation")),
    }
    start, rows = time.perf_counter(), []
    for groups in args.groups:
        for seed in args.seeds:
            base = base_model(groups, seed, args.pretrain_steps)
            base_loss = round(loss_on(base, data["validation"]), 5)
            for method in args.methods:
                for row in runs_for(base, method, data, args):
                    rows.append({"n_groups": groups, "seed": seed, "base_loss": base_loss, **row})
                    print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / f"{args.name}.csv")
    print("\n".join(summary(rows)))
    print(f"wall {time.perf_counter() - start:.0f}s; wrote {args.out / args.name}.csv")


if __name__ == "__main__":
    main()
