"""Warmup scores and per-layer selection of channels and states (docs/method.md §3, §6 for Mamba-2).

Pure functions on the dense warmup updates of one layer. The score is the squared *update* that warmup made
(ΔA = A_log after - A_log before), not a gradient. Ranking is deterministic: a stable sort, best first, and on
equal scores the lower index wins.
"""

from __future__ import annotations

import torch


class SelectionError(ValueError):
    """The warmup updates cannot support a selection (all zero, or not finite)."""


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dim, best first; ties go to the lower index."""
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"cannot pick {k} of {scores.shape[-1]} entries")
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k].contiguous()


def _checked_squares(name: str, delta: torch.Tensor) -> torch.Tensor:
    squares = delta.detach().float().pow(2)
    if not torch.isfinite(squares).all():
        raise SelectionError(f"{name}: the warmup update holds NaN or inf values")
    if not squares.any():
        # Ranking all-zero updates would pick arbitrary entries; the official code asserts the same.
        raise SelectionError(f"{name}: the warmup update is all zero, so nothing can be ranked (did warmup train it?)")
    return squares


def select_channels_and_states(
    delta_a_log: torch.Tensor, n_channels: int, n_states: int, *, name: str = "A_log"
) -> dict[str, torch.Tensor]:
    """Mamba-1 / Jamba selection from one layer's ΔA_log of shape (channels, states).

    Returns ``channels`` (k_c,): the channels with the largest Σ_n ΔA[c, n]², best first; and ``states``
    (k_c, k_s): for each selected channel its own top states by ΔA[c, n]².
    """
    squares = _checked_squares(name, delta_a_log)
    channels = top_indices(squares.sum(dim=1), n_channels)
    states = top_indices(squares[channels], n_states)
    return {"channels": channels, "states": states}


def select_heads_and_rows(
    delta_a_log: torch.Tensor,
    delta_b: torch.Tensor,
    delta_c: torch.Tensor,
    *,
    n_heads: int,
    n_states: int,
    n_inputs: int,
    heads_per_group: int,
    name: str = "A_log",
) -> dict[str, torch.Tensor]:
    """Mamba-2 selection (our generalisation, docs/method.md §6: heads play channels, B/C rows of in_proj play states).

    ``delta_a_log`` is (heads,); ``delta_b`` and ``delta_c`` are (groups, states, hidden). Returns ``channels``
    (k_h,) heads by ΔA_log²; ``groups`` (g,) the groups that hold a selected head, ascending; ``states`` (g, k_s)
    per group the rows with the largest ‖ΔB[g, n]‖² + ‖ΔC[g, n]‖²; ``inputs`` (g, k_s, k_d) per selected row the
    hidden inputs with the largest ΔB² + ΔC².
    """
    head_squares = _checked_squares(name, delta_a_log)
    row_squares = _checked_squares(f"{name} (B/C rows)", delta_b) + _checked_squares(f"{name} (B/C rows)", delta_c)
    heads = top_indices(head_squares, n_heads)
    groups = torch.unique(torch.div(heads, heads_per_group, rounding_mode="floor"), sorted=True)
    states = top_indices(row_squares[groups].sum(dim=-1), n_states)
    entry_squares = row_squares[groups.unsqueeze(1), states]  # (g, k_s, hidden)
    inputs = top_indices(entry_squares, n_inputs)
    return {"channels": heads, "groups": groups, "states": states, "inputs": inputs}
