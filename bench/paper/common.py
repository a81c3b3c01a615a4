"""What the paper-reproduction scripts share: the CSV and the "best MSE vs % trainable parameters" plot."""

from __future__ import annotations

import csv
from pathlib import Path


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(
    rows: list[dict],
    path: Path,
    labels: dict[str, str],
    title: str,
    bucket: float | None = None,
    metric: str = "best_mse",
) -> None:
    """``metric`` against % trainable parameters: one curve per method through its best run per ``bucket``-wide %
    range (every run if None), like the paper's plot, and every run as a faint dot. Methods named "frozen" and
    "full" are drawn as horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    curve_values = [r[metric] for r in rows if r["method"] != "frozen"]
    for method, label in labels.items():
        runs = [r for r in rows if r["method"] == method]
        if not runs:
            continue
        if method in ("frozen", "full"):
            style = "--" if method == "frozen" else ":"
            for r in runs:
                text = f"{label} ({r['pct_params']:.1f}%): {r[metric]:.3g}"
                ax.axhline(r[metric], linestyle=style, color="k", label=text)
            continue
        best: dict[float, dict] = {}
        for r in runs:
            key = r["pct_params"] // bucket if bucket else r["pct_params"]
            if key not in best or r[metric] < best[key][metric]:
                best[key] = r
        curve = sorted(best.values(), key=lambda r: r["pct_params"])
        (line,) = ax.plot([r["pct_params"] for r in curve], [r[metric] for r in curve], "o-", label=label)
        ax.scatter([r["pct_params"] for r in runs], [r[metric] for r in runs], color=line.get_color(), alpha=0.3)
    if len(set(curve_values)) > 1:  # a far-off frozen line would squash the curves; its value is in the legend
        low, high = min(curve_values), max(curve_values)
        ax.set_ylim(low - 0.1 * (high - low), high + 0.25 * (high - low))
    ax.set_xlabel("trainable parameters (% of the frozen model)")
    ax.set_ylabel({"best_mse": "best training MSE (fresh batches)", "eval_mse": "held-out MSE"}.get(metric, metric))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
