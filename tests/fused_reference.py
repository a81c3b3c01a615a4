"""Pure-PyTorch stand-ins for the CUDA kernels behind ``sdt.fused`` (its ``MambaKernels`` protocol), for CPU tests.

Same contract as ``sdt.fused.CudaKernels``: outputs are allocated the way the CUDA kernels allocate them
(``empty_like`` of the same input, so the Function's no-copy layout assumptions are exercised), backward writes
into the buffers it is given, arithmetic is fp32 with results in the input dtype. Backward recomputes the forward
and differentiates it with ``torch.autograd.grad``. The scan is a per-step loop: fine for the tiny test models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    width = weight.shape[-1]
    y = F.conv1d(
        x.float(),
        weight.float().unsqueeze(1),
        None if bias is None else bias.float(),
        padding=width - 1,
        groups=x.shape[1],
    )
    return F.silu(y[..., : x.shape[-1]])


def _conv_apart(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seq_idx: torch.Tensor
) -> torch.Tensor:
    """:func:`_conv` where each position reads only the positions of its own example (``seq_idx``, (b, l)): tap ``k``
    looks ``width - 1 - k`` positions back, and a position of another example (or before the row) reads as zero."""
    width, length = weight.shape[-1], x.shape[-1]
    x, y = x.float(), x.new_zeros(x.shape, dtype=torch.float32)
    for k in range(width):
        back = width - 1 - k
        shifted = F.pad(x, (back, 0))[..., :length]
        same = seq_idx == F.pad(seq_idx, (back, 0), value=-1)[..., :length]
        y = y + weight.float()[None, :, k, None] * shifted * same[:, None, :]
    return F.silu(y if bias is None else y + bias.float()[None, :, None])


def _scan(u, delta, A, B, C, D, z, delta_bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y + D·u, (y + D·u) · SiLU(z), last state) in fp32; u, delta, z (b, d, l), B, C (b, 1, n, l)."""
    dt = F.softplus(delta.float() + delta_bias.float()[:, None])
    b_t, c_t = B[:, 0].float().transpose(1, 2), C[:, 0].float().transpose(1, 2)  # (b, l, n)
    decay = torch.exp(dt[..., None] * A[:, None, :])  # (b, d, l, n)
    drive = dt[..., None] * b_t[:, None] * u.float()[..., None]
    state = torch.zeros_like(decay[:, :, 0])
    ys = []
    for t in range(u.shape[-1]):
        state = decay[:, :, t] * state + drive[:, :, t]
        ys.append((state * c_t[:, None, t]).sum(-1))
    out = torch.stack(ys, dim=-1) + u.float() * D[:, None]
    return out, out * F.silu(z.float()), state


def _like(template: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(template).copy_(value)


class ReferenceKernels:
    device_type = None
    name = "pure-PyTorch reference kernels (tests)"

    def conv1d_fwd(self, x, weight, bias):
        return _like(x, _conv(x, weight, bias))

    def conv1d_bwd(self, x, weight, bias, dout, dx):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
            out = _conv(*leaves, None) if bias is None else _conv(*leaves)
            grads = torch.autograd.grad(out, leaves, dout.float())
        dx.copy_(grads[0])
        return grads[1], (None if bias is None else grads[2])

    def scan_fwd(self, u, delta, A, B, C, D, z, delta_bias):
        out, out_z, last_state = _scan(u, delta, A, B, C, D, z, delta_bias)
        return _like(delta, out), last_state, _like(z, out_z)

    def last_state(self, saved):
        return saved

    def scan_bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, saved, out, dz):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
            _, out_z, _ = _scan(*leaves)
            du, ddelta, dA, dB, dC, dD, dz_value, ddelta_bias = torch.autograd.grad(out_z, leaves, dout.float())
        dz.copy_(dz_value)
        return (
            _like(u, du),
            _like(delta, ddelta),
            dA,
            _like(B, dB),
            _like(C, dC),
            dD,
            ddelta_bias,
            _like(out, out_z.detach()),
        )


class ReferenceMamba2Kernels:
    """``sdt.fused.Mamba2Kernels`` in plain autograd ops, fp32 inside: the conv, a per-step SSD recurrence (heads
    share their group's B and C) from zero or the initial states given, the D skip and the gated RMSNorm
    ``norm(y · SiLU(z))`` (without a norm weight: ``y · SiLU(z)``); with ``seq_idx``, the conv and the recurrence of
    each example see none of the example before it in its row. ``calls`` counts forwards, so that a test can tell
    which path ran."""

    device_type = None
    name = "pure-PyTorch reference Mamba-2 kernels (tests)"

    def __init__(self) -> None:
        self.calls = 0

    def split_conv1d_scan(
        self,
        zxbcdt,
        conv_weight,
        conv_bias,
        dt_bias,
        A,
        D,
        chunk_size,
        dt_limit,
        norm_weight,
        norm_eps,
        headdim,
        ngroups,
        final_state,
        seq_idx=None,
        initial_states=None,
    ):
        self.calls += 1
        batch, length, _ = zxbcdt.shape
        heads, dim = A.shape[0], A.shape[0] * headdim
        states = (conv_weight.shape[0] - dim) // (2 * ngroups)
        z, xbc, dt = zxbcdt.float().split([dim, conv_weight.shape[0], heads], dim=-1)
        if seq_idx is None:
            xbc = _conv(xbc.transpose(1, 2), conv_weight, conv_bias).transpose(1, 2)
        else:
            xbc = _conv_apart(xbc.transpose(1, 2), conv_weight, conv_bias, seq_idx).transpose(1, 2)
        x, B, C = xbc.split([dim, ngroups * states, ngroups * states], dim=-1)
        x = x.reshape(batch, length, heads, headdim)
        B, C = (t.reshape(batch, length, ngroups, states).repeat_interleave(heads // ngroups, dim=2) for t in (B, C))
        dt = F.softplus(dt + dt_bias.float()).clamp(*dt_limit)
        state = x.new_zeros(batch, heads, headdim, states)
        if initial_states is not None:
            state = state + initial_states.float()
        ys = []
        for t in range(length):
            decay = torch.exp(dt[:, t] * A)[..., None, None]
            if seq_idx is not None and t:  # an example starts from a zero state
                decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None, None, None]
            state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            ys.append((state * C[:, t, :, None, :]).sum(-1))
        y = (torch.stack(ys, dim=1) + x * D.float()[:, None]).reshape(batch, length, dim) * F.silu(z)
        if norm_weight is None:  # no gated norm (Falcon-H1's mamba_rms_norm off): the gate alone
            return y.to(zxbcdt.dtype), (state if final_state else None)
        grouped = y.reshape(batch, length, ngroups, dim // ngroups)
        y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + norm_eps)).reshape(batch, length, dim)
        return (norm_weight.float() * y).to(zxbcdt.dtype), (state if final_state else None)
