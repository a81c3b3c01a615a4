"""The paper's S4 synthetic experiment: SDT and SDLoRA against LoRA on a deep random S4D
(docs/paper-reproduction.md, part 1).

    nice -n 19 python bench/paper/synthetic_s4.py                   # main run (batch 64, 500 iterations)
    nice -n 19 python bench/paper/synthetic_s4.py --quick           # 1-2 minute smoke run

Diagnostics, each with the official script's behaviour that the main run leaves out::

    nice -n 19 python bench/paper/synthetic_s4.py --methods lora_s4_proj_official --name s4_synthetic_official_lora
    nice -n 19 python bench/paper/synthetic_s4.py --methods frozen sdt --prune 16 8 --name s4_synthetic_pruned
    nice -n 19 python bench/paper/synthetic_s4.py --methods sdt --score official --name s4_synthetic_official_score

A frozen random 4-layer S4D (H=64, N=16; "DeepS4D, theory mode": no embedding, residual or norm) learns to imitate
a random 1-layer S4D target (N=8) on fresh random integer inputs, with each method's trainable parameters. The
metric is the paper's: the minimum training MSE over the iterations (each batch is new data, so this is in effect a
test loss). The x axis is trainable parameters / frozen-model parameters (33,536).

Methods (all train D; all but frozen train b): ``frozen``; ``lora_proj``: LoRA on W; ``lora_s4_proj``: LoRA on W +
rank-r LoRA on a, θ, C + full log_dt (the SSM LoRA attached, unlike the official script, whose arm is
``lora_s4_proj_official``); ``sdt``: δ on C, a, θ at the selected (channel, state) entries + the W columns of the
selected channels + full log_dt; ``sdlora``: SDT on the SSM, LoRA on W; ``full``. SDT's selection comes from one
20-step warmup on the SSM parameters + D, shared by every SDT and SDLoRA run (its data and optimizer do not depend
on the counts), ranked per layer with ``sdt.select_channels_and_states``.

Writes ``<name>.csv`` and ``<name>.png`` to ``--out``. Results: docs/paper-reproduction.md.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import plot, write_csv
from torch import nn

import sdt

H, L = 64, 200  # model width and sequence length of the paper's run
FROZEN_LAYERS, FROZEN_N = 4, 16
TARGET_LAYERS, TARGET_N = 1, 8
SEED = 123

# Sweep points, chosen so every method has points across 5-35% trainable parameters. Trainable counts for the
# 4-layer frozen model: frozen 256 (D); lora_proj 512(r+1); lora_s4_proj 512 r_proj + 1280 r_ssm + 768;
# sdt 16 k_c k_s + 256 k_c + 768; sdlora 16 k_c k_s + 512 r + 768.
SWEEP = [
    ("frozen", {}),  # 0.8 %
    *[("lora_proj", {"r": r}) for r in (2, 4, 8, 16)],  # 4.6 / 7.6 / 13.7 / 26.0 %
    *[("lora_s4_proj", {"r": rp, "r_ssm": rs}) for rp, rs in ((1, 1), (4, 1), (8, 2), (16, 1))],  # 7.6/12.2/22.1/30.5
    *[("sdt", {"k_c": c, "k_s": s}) for c, s in ((4, 4), (8, 8), (16, 8), (32, 4))],  # 6.1 / 11.5 / 20.6 / 32.8 %
    *[("sdlora", {"k_c": c, "k_s": s, "r": r}) for c, s, r in ((4, 4, 2), (8, 8, 4), (16, 16, 4), (32, 16, 4))],
    ("full", {}),
]
# The official run_s4.py's "LoRA (S4+Proj)": it never attaches the SSM LoRA, so it trains log_dt, D, b and
# the W LoRA: 512 r + 768 = 8.4 / 14.5 / 26.7 %, the x positions of the paper's curve. Run with --methods.
OFFICIAL_SWEEP = [("lora_s4_proj_official", {"r": r}) for r in (4, 8, 16)]
QUICK_SWEEP = [
    ("frozen", {}),
    ("lora_proj", {"r": 4}),
    ("lora_s4_proj", {"r": 1, "r_ssm": 1}),
    ("sdt", {"k_c": 8, "k_s": 8}),
    ("sdlora", {"k_c": 8, "k_s": 8, "r": 4}),
    ("full", {}),
]
LABELS = {
    "frozen": "Frozen",
    "lora_proj": "LoRA (Proj)",
    "lora_s4_proj": "LoRA (S4+Proj)",
    "lora_s4_proj_official": "LoRA (S4+Proj), official script",
    "sdt": "SDT",
    "sdlora": "SDLoRA",
    "full": "Full FT",
}


# -- the model ---------------------------------------------------------------------------------------------------


class CausalConv(torch.autograd.Function):
    """y = causal_conv(u, K) by FFT with n = 2L, keeping the first L outputs (as the official S4D).

    Autograd through rfft/irfft spends most of a CPU step in a complex-to-complex backward; the gradients are
    themselves FFT correlations of the same spectra, which halves the transforms per layer.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        n = 2 * u.shape[-1]
        u_f, k_f = torch.fft.rfft(u, n=n), torch.fft.rfft(k, n=n)
        ctx.save_for_backward(u_f, k_f)
        return torch.fft.irfft(u_f * k_f, n=n)[..., : u.shape[-1]]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        u_f, k_f = ctx.saved_tensors
        length = grad.shape[-1]
        g_f = torch.fft.rfft(grad, n=2 * length)
        grad_u = grad_k = None
        if ctx.needs_input_grad[0]:  # grad_u[t] = Σ_{s>=t} g[s] K[s-t]
            grad_u = torch.fft.irfft(g_f * k_f.conj(), n=2 * length)[..., :length]
        if ctx.needs_input_grad[1]:  # grad_K[j] = Σ_b Σ_t g[t] u[t-j]
            grad_k = torch.fft.irfft((g_f * u_f.conj()).sum(0), n=2 * length)[..., :length]
        return grad_u, grad_k


def random_s4d(n_layers: int, n_states: int) -> list[dict[str, torch.Tensor]]:
    """The official "random" init: D ~ N(0, 1); log_dt ~ U(log 1e-3, log 1e-1); C complex randn (stored
    (H, N, 2)); a = log U(0,1); θ = π·randint(0, N); W, b: nn.Linear's default. Drawn from the global CPU RNG in the
    official module's order, so the same seed gives the official script's target and frozen weights."""
    layers = []
    for _ in range(n_layers):
        d = torch.randn(H)
        log_dt = torch.rand(H) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3)
        c = torch.view_as_real(torch.randn(H, n_states, dtype=torch.cfloat)).contiguous()
        a = torch.log(torch.rand(H, n_states))
        theta = math.pi * torch.randint(0, n_states, (H, n_states))
        linear = nn.Linear(H, H)
        layers.append(
            {
                "a": a,
                "theta": theta,
                "C": c,
                "log_dt": log_dt,
                "D": d,
                "W": linear.weight.detach(),
                "b": linear.bias.detach(),
            }
        )
    return layers


def s4d_layer(u: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """One theory-mode S4D layer on u (B, H, L): ZOH-discretised diagonal SSM kernel, FFT conv, + D·u, ReLU(W y + b)."""
    a = torch.complex(-torch.exp(p["a"]), p["theta"])  # A = -exp(a) + iθ
    dt_a = a * torch.exp(p["log_dt"])[:, None]
    c = torch.view_as_complex(p["C"]) * (torch.exp(dt_a) - 1) / a  # ZOH, B ≡ 1 absorbed into C
    powers = torch.exp(dt_a[..., None] * torch.arange(u.shape[-1], dtype=torch.float32))
    kernel = 2 * torch.einsum("hn,hnl->hl", c, powers).real
    # D·u is the lag-0 tap of the same convolution: folding it into K saves two full-size ops per layer and step.
    kernel = torch.cat([kernel[:, :1] + p["D"][:, None], kernel[:, 1:]], dim=1)
    y = CausalConv.apply(u, kernel)
    return F.relu(torch.matmul(p["W"], y) + p["b"][:, None])


class Student(nn.Module):
    """A frozen S4D stack whose tensors can each be routed through an adapter (base tensor -> effective tensor)."""

    def __init__(self, base: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.base = [{k: v.clone() for k, v in layer.items()} for layer in base]
        self.adapters = nn.ModuleDict()

    def adapt(self, layer: int, name: str, adapter: nn.Module) -> None:
        self.adapters[f"{layer}_{name}"] = adapter

    def effective(self, layer: int) -> dict[str, torch.Tensor]:
        return {
            k: self.adapters[f"{layer}_{k}"](v) if f"{layer}_{k}" in self.adapters else v
            for k, v in self.base[layer].items()
        }

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        for layer in range(len(self.base)):
            u = s4d_layer(u, self.effective(layer))
        return u


# -- adapters ----------------------------------------------------------------------------------------------------


class Full(nn.Module):
    """The whole tensor trains."""

    def __init__(self, base: torch.Tensor) -> None:
        super().__init__()
        self.value = nn.Parameter(base.clone())

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return self.value


class LowRank(nn.Module):
    """base + left @ right with a zero-init left factor and no scaling, as the official code builds it; complex if
    ``right`` is.

    Real or complex, the factors are stored as real tensors, so parameter counts and AdamW see real numbers.
    """

    def __init__(self, rows: int, right: torch.Tensor) -> None:
        super().__init__()
        self.complex = right.is_complex()
        self.right = nn.Parameter(torch.view_as_real(right).clone() if self.complex else right)
        self.left = nn.Parameter(torch.zeros(rows, *self.right.shape[:1], *self.right.shape[2:]))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if self.complex:
            delta = torch.view_as_complex(self.left) @ torch.view_as_complex(self.right)
            return base + torch.view_as_real(delta)
        return base + self.left @ self.right


class SparseRows(nn.Module):
    """δ on selected rows of the base viewed as (rows, width): (h, n) entries of a/θ (width 1) or C (width 2),
    or, with ``transpose``, columns of W (one column = one channel's output weights)."""

    def __init__(self, rows: torch.Tensor, width: int, transpose: bool = False) -> None:
        super().__init__()
        self.register_buffer("rows", rows)
        self.transpose = transpose
        self.delta = nn.Parameter(torch.zeros(len(rows), width))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        view = base.t() if self.transpose else base
        out = view.reshape(-1, self.delta.shape[1]).index_add(0, self.rows, self.delta).view(view.shape)
        return out.t() if self.transpose else out


def lora_w(rank: int) -> LowRank:
    right = torch.empty(rank, H)
    nn.init.kaiming_uniform_(right, a=math.sqrt(5))  # the usual LoRA down-projection init (PEFT's)
    return LowRank(H, right)


def build(method: str, cfg: dict, frozen: list[dict], warm: list[dict] | None, args) -> Student:
    """The student for one sweep point. ``warm``: the warmed-up layers (SDT arms and pruning need them);
    ``args.prune``: (channels, states per channel) to keep usable, or None (no pruning: the method as the paper
    states it); ``args.score``: the update score that ranks SDT's dims."""
    torch.manual_seed(SEED)  # every run draws its LoRA factors from the same stream, whatever ran before
    student = Student(frozen)
    n_states = frozen[0]["a"].shape[1]
    for i, layer in enumerate(frozen):
        usable = usable_entries(warm[i], *args.prune) if args.prune else None
        picked = None
        if method in ("sdt", "sdlora"):
            magnitude = update_magnitude(layer, warm[i], args.score)
            # The official code ranks update dims among the usable ones only; unusable entries score 0 here.
            picked = sdt.select_channels_and_states(
                magnitude if usable is None else magnitude * usable, cfg["k_c"], cfg["k_s"], name=f"layer {i}"
            )
        if usable is not None:
            # Official pruning: C = 0 on unusable channels, and on the unusable states of the updated channels.
            zero = ~usable.any(dim=1, keepdim=True).expand_as(usable).clone()
            if picked is not None:
                zero[picked["channels"]] |= ~usable[picked["channels"]]
            student.base[i]["C"][zero] = 0
        if method == "frozen":  # the official freeze/freeze arm still trains D (its D_method defaults to full)
            student.adapt(i, "D", Full(layer["D"]))
            continue
        if method == "full":
            for name, tensor in layer.items():
                student.adapt(i, name, Full(tensor))
            continue
        for name in ("D", "b") + (("log_dt",) if method != "lora_proj" else ()):
            student.adapt(i, name, Full(layer[name]))
        if method == "lora_s4_proj":
            student.adapt(i, "a", LowRank(H, torch.randn(cfg["r_ssm"], n_states)))
            student.adapt(i, "theta", LowRank(H, torch.randn(cfg["r_ssm"], n_states)))
            student.adapt(i, "C", LowRank(H, torch.randn(cfg["r_ssm"], n_states, dtype=torch.cfloat)))
        if picked is not None:
            rows = picked["channels"].repeat_interleave(cfg["k_s"]) * n_states + picked["states"].reshape(-1)
            student.adapt(i, "a", SparseRows(rows, 1))
            student.adapt(i, "theta", SparseRows(rows, 1))
            student.adapt(i, "C", SparseRows(rows, 2))
        if method == "sdt":
            student.adapt(i, "W", SparseRows(picked["channels"], H, transpose=True))
        else:
            student.adapt(i, "W", lora_w(cfg["r"]))
    return student


# -- training ----------------------------------------------------------------------------------------------------


def batches(batch: int, seed: int):
    """Fresh inputs every iteration (randint 0..9); the same stream for every method."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, 10, (batch, H, L), generator=generator).float()


def train(
    student: nn.Module, target: nn.Module, params: list[nn.Parameter], iterations: int, lr: float, batch: int
) -> list[float]:
    """AdamW with torch defaults (weight_decay 0.01), no schedule; the MSE of every iteration."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _, x in zip(range(iterations), batches(batch, SEED)):
        with torch.no_grad():
            y = target(x)
        loss = F.mse_loss(student(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def warmup(frozen: list[dict], target: nn.Module, args) -> list[dict[str, torch.Tensor]]:
    """The warmed-up layers: 20 AdamW steps at lr 1e-2 on the SSM parameters (a, θ, C, log_dt) + D of a copy of
    the frozen model (the official ``ssm`` warmup)."""
    student = Student(frozen)
    for i, layer in enumerate(frozen):
        for name in ("a", "theta", "C", "log_dt", "D"):
            student.adapt(i, name, Full(layer[name]))
    train(student, target, list(student.parameters()), args.warmup_iterations, args.warmup_lr, args.batch)
    return [{k: v.detach().clone() for k, v in student.effective(i).items()} for i in range(len(frozen))]


def update_magnitude(frozen: dict, warm: dict, score: str) -> torch.Tensor:
    """sqrt(Δa² + Δθ²) per (channel, state): ``select_channels_and_states`` squares it, which gives the intended
    update score |a_warm - a_0|² + |θ_warm - θ_0|² per entry, summed over states for a channel.

    ``score="official"`` reproduces run_s4.py's quirk instead: it subtracts +exp(a_0) from the warmed-up
    -exp(a_warm), so the "update" is about 2·|Re A| and ranks by the decay rate, hardly by what warmup changed.
    """
    if score == "official":
        return torch.hypot(-torch.exp(warm["a"]) - torch.exp(frozen["a"]), warm["theta"] - frozen["theta"])
    return torch.hypot(warm["a"] - frozen["a"], warm["theta"] - frozen["theta"])


def usable_entries(warm: dict, channels: int, states: int) -> torch.Tensor:
    """The official pruning's "usable" dims (in their intended complex-A version), as a (channel, state) mask:
    the channels, and per channel the states, with the largest kernel contribution |C̃ exp(ΔA·⌊L/2⌋)| on the
    warmed-up weights."""
    a = torch.complex(-torch.exp(warm["a"]), warm["theta"])
    dt_a = a * torch.exp(warm["log_dt"])[:, None]
    contribution = torch.view_as_complex(warm["C"]) * (torch.exp(dt_a) - 1) / a * torch.exp(dt_a * (L // 2))
    picked = sdt.select_channels_and_states(contribution.abs(), channels, states, name="pruning")
    mask = torch.zeros(contribution.shape, dtype=torch.bool)
    mask[picked["channels"][:, None], picked["states"]] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="inputs per iteration (the paper: 4000)")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--warmup-iterations", type=int, default=20)
    parser.add_argument("--warmup-lr", type=float, default=1e-2)
    parser.add_argument("--bucket", type=float, default=5.0, help="width in %% of the plot's best-per-bucket curve")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 methods, 60 iterations, batch 32")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(LABELS),
        default=sorted({m for m, _ in SWEEP}),
        help="sweep points of these methods only (default: all but lora_s4_proj_official)",
    )
    parser.add_argument(
        "--prune",
        nargs=2,
        type=int,
        metavar=("CHANNELS", "STATES"),
        help="the official hard mode's pruning (off by default): per layer keep CHANNELS "
        "usable channels and STATES usable states per channel, zero C elsewhere",
    )
    parser.add_argument(
        "--score",
        choices=("intended", "official"),
        default="intended",
        help="SDT's update score: the intended |Δa|² + |Δθ|², or run_s4.py's quirky one (see update_magnitude)",
    )
    parser.add_argument("--name", default="s4_synthetic", help="file name stem of the CSV and PNG")
    parser.add_argument("--out", type=Path, default=Path("bench/paper/results"))
    args = parser.parse_args()
    sweep = [(m, cfg) for m, cfg in SWEEP + OFFICIAL_SWEEP if m in args.methods]
    if args.quick:
        args.iterations, args.batch, args.warmup_iterations, args.name = 60, 32, 5, f"{args.name}_quick"
        sweep = [(m, cfg) for m, cfg in QUICK_SWEEP if m in args.methods]
    if args.prune:  # as the official code requires: updated dims must be usable ones
        keep = [(m, c) for m, c in sweep if c.get("k_c", 0) <= args.prune[0] and c.get("k_s", 0) <= args.prune[1]]
        print(f"--prune {args.prune}: skipping {[p for p in sweep if p not in keep]}")
        sweep = keep
    torch.set_num_threads(1)  # a shared 2-core machine

    start = time.perf_counter()
    torch.manual_seed(SEED)  # one stream: the target first, then the frozen model (the official draw order)
    target = Student(random_s4d(TARGET_LAYERS, TARGET_N))
    frozen = random_s4d(FROZEN_LAYERS, FROZEN_N)
    frozen_params = sum(t.numel() for layer in frozen for t in layer.values())
    warm = None
    if args.prune or any(m in ("sdt", "sdlora") for m, _ in sweep):
        warm = warmup(frozen, target, args)
        print(f"warmup: {args.warmup_iterations} steps, {time.perf_counter() - start:.0f}s", flush=True)

    rows = []
    for method, cfg in sweep:
        t0 = time.perf_counter()
        student = build(method, cfg, frozen, warm, args)
        params = [p for p in student.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        losses = train(student, target, params, args.iterations, args.lr, args.batch)
        rows.append(
            {
                "method": method,
                "config": " ".join(f"{k}={v}" for k, v in cfg.items()),
                "trainable": trainable,
                "pct_params": round(100 * trainable / frozen_params, 2),
                "untuned_mse": round(losses[0], 4),  # the frozen model's loss on the first batch, before any step
                "best_mse": round(min(losses), 4),
                "last_mse": round(losses[-1], 4),
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
        "S4 synthetic: deep random S4D imitating a 1-layer target",
        args.bucket,
    )
    print(
        f"frozen-model params {frozen_params}; batch {args.batch}; {args.iterations} iterations; "
        f"wall {time.perf_counter() - start:.0f}s; wrote {args.out / args.name}.csv/.png"
    )


if __name__ == "__main__":
    main()
