"""An initial state for mamba-ssm's selective scan, which takes none: written in by N tokens put before the sequence.

The scan's step is ``h ← exp(Δ A) ⊙ h + Δ B u`` with B shared by the channels, so one token writes a rank-one state.
Token k of the prefix (k = 0 … N−1) has B = e_k (the k-th state alone), one step Δ_e per channel and input
``u[e, k] = h⁰[e, k] · exp(−(N−1−k) Δ_e A[e, k]) / Δ_e``: it writes state k, and the N−1−k prefix tokens after it
decay that by exactly the factor its input undid, so the state at the sequence's first token is h⁰ (to fp32 rounding:
the kernel multiplies the decays one by one, the input divides by their product at once). Δ_e is chosen so that no
factor leaves [e⁻¹, e]. The prefix costs the scan N more steps of a sequence (16 on Mamba-1) and copies of its
inputs; its outputs are dropped.

Padding takes no step (Δ = 0: ``softplus`` of a very negative input), so a left-padded sequence starts from h⁰ at
its first token, as :func:`sdt.state.forward` holds it; a pad feeds nothing in (its input is zeroed). The gradients:
the prefix's own steps are constants (its Δ does not follow dt_proj), and the kernel's dA, which holds the prefix's
inputs fixed, is completed by the inputs' dependence on A, so that A's gradient is that of a scan from h⁰.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# what Δ's input becomes on a pad: softplus gives exactly 0 in fp32 and bf16, so the step neither decays nor writes
NO_STEP = -1.0e4


class InitialStatePrefix:
    """The prefix for one call of the scan: ``value`` h⁰ (E, N) fp32, A (E, N) fp32, dt_bias (E,) fp32; inputs in
    ``dtype`` (the scan's)."""

    def __init__(self, value: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor, dtype: torch.dtype) -> None:
        self.length = A.shape[1]
        target = 1.0 / (max(self.length - 1, 1) * A.detach().abs().amax(1)).clamp_min(1.0)  # Δ_e · |A| · (N−1) ≤ 1
        # the kernel reads Δ's input in its own dtype: the step is what it computes from the rounded input
        self.raw = (target + torch.log(-torch.expm1(-target)) - dt_bias).to(dtype)  # softplus⁻¹(target) − bias
        self.step = F.softplus(self.raw.float() + dt_bias)[:, None]  # (E, 1)
        self.after = torch.arange(self.length - 1, -1, -1, device=A.device, dtype=torch.float32)  # N−1−k
        self.gain = torch.exp(-self.after * self.step * A) / self.step  # (E, N)
        self.value = value
        self.inputs = (value * self.gain).to(dtype)
        self.one_hot = torch.eye(self.length, device=A.device, dtype=dtype)

    def extend(self, t: torch.Tensor, head: torch.Tensor | float) -> torch.Tensor:
        """(b, c, l) -> (b, c, N + l) with ``head`` (c, N) or a number first, stored (c, b, N + l) as the Function
        keeps its activations (stride 1 along length)."""
        batch, channels, length = t.shape
        out = t.new_empty(channels, batch, self.length + length).transpose(0, 1)
        out[..., : self.length] = head
        out[..., self.length :] = t
        return out

    def scan_inputs(self, u, delta, B, C, z, token_mask):
        """The scan's (u, delta, B, C, z) with the prefix first: u, delta, z (b, E, l), B, C (b, N, l)."""
        if token_mask is not None:
            delta = delta.masked_fill(token_mask == 0, NO_STEP)
        # fmt: off
        return (
            self.extend(u, self.inputs), self.extend(delta, self.raw[:, None]), self.extend(B, self.one_hot),
            self.extend(C, 0.0), self.extend(z, 0.0),
        )
        # fmt: on

    def cut(self, t: torch.Tensor) -> torch.Tensor:
        """(b, c, N + l) -> the sequence's part as a (c, b·l) matrix (a copy)."""
        return t[..., self.length :].transpose(0, 1).reshape(t.shape[1], -1)

    def gradients(self, d_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d h⁰, the part of dA that the inputs' dependence on A adds) from d(prefix inputs) (b, E, N)."""
        d_sum = d_inputs.float().sum(0)
        return d_sum * self.gain, d_sum * self.value * self.gain * (-self.after * self.step)
