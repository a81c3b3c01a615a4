"""One autograd Function for a Mamba-1 mixer from ``xz`` (in_proj's output) to the mixer output.

In the manner of mamba-ssm's ``MambaInnerFn``: causal conv1d, x_proj, dt_proj, the selective scan and out_proj
in one node, conv output and delta recomputed in backward (what MambaInnerFn calls checkpoint level 1). It differs
in two ways that make parameter-efficient training cheaper:

* **Only the gradients something needs.** Each weight's gradient is computed only when ``ctx.needs_input_grad``
  says so; a frozen out_proj costs no (D, E) weight gradient. LoRA on out_proj runs in activation space,
  ``y = W0 o + s · B (A o)``, so its factors get their gradients from two rank-r products and W0's gradient is never
  formed. x_proj, dt_proj, A_log, D and the conv are small: when they carry an adapter, the Function returns the
  gradient of the effective tensor and autograd carries it on to the adapter.
* **No layout copies.** Every activation lives in (channels, batch · length) memory, the layout the kernels
  want along length and cuBLAS takes as a plain or transposed operand: xz comes in as ``W_in @ h.T``, the conv and
  the scan allocate their outputs like their inputs, and every projection is a single ``mm`` on such matrices.

Jamba's mixer normalises dt (before dt_proj), B and C with RMSNorms over their channels; the Function applies them
exactly where transformers' ``JambaMambaMixer`` does and backpropagates through them with autograd on those small
(rank + 2·state, tokens) tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .kernels import MambaKernels
from .prefix import InitialStatePrefix


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """(b, c, l) stored as (c, b, l) -> the (c, b·l) matrix, as a view (raises rather than copy)."""
    return t.transpose(0, 1).view(t.shape[1], -1)


def as_batched(m: torch.Tensor, batch: int) -> torch.Tensor:
    """(c, b·l) -> (b, c, l), a view with stride 1 along l."""
    return m.view(m.shape[0], batch, -1).transpose(0, 1)


def rms_norm_channels(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' JambaRMSNorm over dim 0 of a (channels, tokens) matrix: fp32 statistics, then the input
    dtype, then the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(0, keepdim=True) + eps)
    return weight[:, None] * normed.to(x.dtype)


def _ssm_inputs(
    x_dbl: torch.Tensor,
    rank: int,
    state: int,
    norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    eps: tuple[float, float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_proj's output rows [dt | B | C], through Jamba's norms when there are any."""
    dt_low, b, c = x_dbl[:rank], x_dbl[rank : rank + state], x_dbl[rank + state :]
    if norms is None:
        return dt_low, b, c
    return tuple(rms_norm_channels(t, w, e) for t, w, e in zip((dt_low, b, c), norms, eps))


class MambaInnerFn(torch.autograd.Function):
    """``forward(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, out_weight, out_bias,
    lora_A, lora_B, lora_scaling, dt_norm_weight, b_norm_weight, c_norm_weight, norm_eps, token_mask, record_state,
    kernels, state_kind, state_value)``.

    xz (b, 2E, l) in (2E, b, l) memory; conv_weight (E, 1, K); x_proj_weight (R + 2N, E); dt_proj_weight (E, R);
    dt_bias, D (E,) and A (E, N) fp32; out_weight (D, E) (the frozen base when lora_A / lora_B are given, fp32
    factors (r, E) / (D, r)); the three norm weights (R,), (N,), (N,) or None; token_mask (b, 1, l) in the compute
    dtype zeroes padding after the conv, as transformers' reference path does; ``record_state(x, last_state)``, if
    given, receives the conv input (b, E, l) and the scan's final state (b, E, N), for a cache to keep;
    ``state_value`` (E, N) fp32, a state offset or initial state (``state_kind``, :mod:`sdt.state`) or None: an
    offset's term ``h' C_t`` is added beside the scan, gated by SiLU(z) as the scan's output is; an initial state is
    written into the scan by a prefix of N tokens (:mod:`.prefix`), since the kernel takes none. Returns (b, l, D).
    """

    @staticmethod
    def forward(
        ctx,
        xz: torch.Tensor,
        conv_weight: torch.Tensor,
        conv_bias: torch.Tensor | None,
        x_proj_weight: torch.Tensor,
        dt_proj_weight: torch.Tensor,
        dt_bias: torch.Tensor,
        A: torch.Tensor,
        D: torch.Tensor,
        out_weight: torch.Tensor,
        out_bias: torch.Tensor | None,
        lora_A: torch.Tensor | None,
        lora_B: torch.Tensor | None,
        lora_scaling: float,
        dt_norm_weight: torch.Tensor | None,
        b_norm_weight: torch.Tensor | None,
        c_norm_weight: torch.Tensor | None,
        norm_eps: tuple[float, float, float],
        token_mask: torch.Tensor | None,
        record_state: Callable[[torch.Tensor, torch.Tensor], None] | None,
        kernels: MambaKernels,
        state_kind: str | None = None,
        state_value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, _, length = xz.shape
        inner, state = A.shape
        rank = dt_proj_weight.shape[1]
        norms = None if dt_norm_weight is None else (dt_norm_weight, b_norm_weight, c_norm_weight)
        x, z = xz[:, :inner], xz[:, inner:]
        conv_out = kernels.conv1d_fwd(x, conv_weight[:, 0], conv_bias)
        if token_mask is not None:
            conv_out.mul_(token_mask)
        x_dbl = torch.mm(x_proj_weight, as_matrix(conv_out))  # (R + 2N, b·l)
        dt_low, b, c = _ssm_inputs(x_dbl, rank, state, norms, norm_eps)
        delta = as_batched(torch.mm(dt_proj_weight, dt_low), batch)
        prefix = None if state_kind != "initial" else InitialStatePrefix(state_value, A, dt_bias, conv_out.dtype)
        out, saved, o = _scan_forward(kernels, prefix, conv_out, delta, A, b, c, D, z, dt_bias, token_mask)
        if state_kind == "offset":  # Σ_n h'[e, n] C_t[n], gated as the scan's output is
            _add_offset_term(o, state_value, c, as_matrix(z))
        if record_state is not None:
            record_state(x.detach(), kernels.last_state(saved))  # with a prefix, from h⁰
        y = torch.mm(o.t(), out_weight.t())  # (b·l, D)
        lora_a = lora_b = low = None
        if lora_A is not None:
            lora_a, lora_b = lora_A.to(o.dtype), lora_B.to(o.dtype)
            low = torch.mm(lora_a, o)  # (r, b·l); B's gradient needs only this
            y.addmm_(low.t(), lora_b.t(), alpha=lora_scaling)
        if out_bias is not None:
            y += out_bias.to(y.dtype)
        # fmt: off
        ctx.save_for_backward(
            xz, conv_weight, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, dt_bias, A, D, out_weight,
            lora_a, lora_b, low, out, saved, dt_norm_weight, b_norm_weight, c_norm_weight, token_mask, state_value,
        )
        # fmt: on
        ctx.lora_scaling, ctx.norm_eps, ctx.kernels, ctx.state_kind = lora_scaling, norm_eps, kernels, state_kind
        ctx.has_out_bias = out_bias is not None
        return y.view(batch, length, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # fmt: off
        (
            xz, conv_weight, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, dt_bias, A, D, out_weight,
            lora_a, lora_b, low, out, saved, dt_norm_weight, b_norm_weight, c_norm_weight, token_mask, state_value,
        ) = ctx.saved_tensors
        # fmt: on
        need = ctx.needs_input_grad
        kernels, scaling = ctx.kernels, ctx.lora_scaling
        batch, _, length = xz.shape
        inner, state = A.shape
        rank = dt_proj_weight.shape[1]
        x, z = xz[:, :inner], xz[:, inner:]
        dy = grad.reshape(batch * length, -1)
        dy_t = dy.t()  # (D, b·l)

        # out_proj, backwards to the scan's output
        dout_z = torch.mm(out_weight.t(), dy_t)  # (E, b·l)
        if lora_a is not None:
            d_low = torch.mm(lora_b.t(), dy_t)  # (r, b·l)
            dout_z.addmm_(lora_a.t(), d_low, alpha=scaling)

        # recompute what forward did not keep
        conv_out = kernels.conv1d_fwd(x, conv_weight[:, 0], conv_bias)
        if token_mask is not None:
            conv_out.mul_(token_mask)
        u = as_matrix(conv_out)
        norms = None if dt_norm_weight is None else (dt_norm_weight, b_norm_weight, c_norm_weight)
        with torch.enable_grad():
            # only Jamba's norms build a graph here: x_dbl and the norm weights become leaves of it
            x_dbl_leaf = x_dbl.detach().requires_grad_(norms is not None)
            norm_leaves = None if norms is None else tuple(w.detach().requires_grad_() for w in norms)
            dt_low, b, c = _ssm_inputs(x_dbl_leaf, rank, state, norm_leaves, ctx.norm_eps)
        delta = torch.mm(dt_proj_weight, dt_low.detach())

        dxz = torch.empty_like(xz)  # the kernels write d(x) and d(z) into its two halves
        dx, dz = dxz[:, :inner], dxz[:, inner:]
        prefix = None if ctx.state_kind != "initial" else InitialStatePrefix(state_value, A, dt_bias, conv_out.dtype)
        # fmt: off
        du, ddelta, dA, db, dc, dD, ddt_bias, o, d_state = _scan_backward(
            kernels, prefix, conv_out, as_batched(delta, batch), A, b.detach(), c.detach(), D, z, dt_bias,
            as_batched(dout_z, batch), saved, out, dz, token_mask,
        )
        # fmt: on
        if ctx.state_kind == "offset":
            d_state = _offset_backward(state_value, c.detach(), as_matrix(z), dout_z, o, as_matrix(dz), dc)
        d_out_weight = torch.mm(dy_t, o.t()) if need[8] else None  # (D, E): full fine-tuning or an unknown adapter
        d_out_bias = dy.sum(0) if ctx.has_out_bias and need[9] else None
        d_lora_A = d_lora_B = None
        if lora_a is not None:
            if need[10]:
                d_lora_A = torch.mm(d_low, o.t()).float().mul_(scaling)  # (r, E)
            if need[11]:
                d_lora_B = torch.mm(dy_t, low.t()).float().mul_(scaling)  # (D, r)

        # dt_proj and x_proj, backwards to the conv output
        d_dt_low = torch.mm(dt_proj_weight.t(), ddelta)  # (R, b·l)
        d_dt_weight = torch.mm(ddelta, dt_low.detach().t()) if need[4] else None
        d_norms: tuple[torch.Tensor | None, ...] = (None, None, None)
        if norms is None:
            dx_dbl = torch.cat([d_dt_low, db, dc])
        else:
            dx_dbl, *d_norms = torch.autograd.grad((dt_low, b, c), (x_dbl_leaf, *norm_leaves), (d_dt_low, db, dc))
        d_x_proj_weight = torch.mm(dx_dbl, u.t()) if need[3] else None

        # the conv, backwards to xz (the first layer of a frozen model needs none of it)
        d_conv_weight = d_conv_bias = None
        if need[0] or need[1] or need[2]:
            as_matrix(du).addmm_(x_proj_weight.t(), dx_dbl)
            if token_mask is not None:
                du.mul_(token_mask)
            d_conv_weight, d_conv_bias = kernels.conv1d_bwd(x, conv_weight[:, 0], conv_bias, du, dx)
            d_conv_weight = d_conv_weight.unsqueeze(1)
        return (
            dxz if need[0] else None,
            d_conv_weight if need[1] else None,
            d_conv_bias if need[2] else None,
            d_x_proj_weight,
            d_dt_weight,
            ddt_bias if need[5] else None,
            dA if need[6] else None,
            dD if need[7] else None,
            d_out_weight,
            d_out_bias,
            d_lora_A,
            d_lora_B,
            None,  # lora_scaling
            d_norms[0] if need[13] else None,
            d_norms[1] if need[14] else None,
            d_norms[2] if need[15] else None,
            None,  # norm_eps
            None,  # token_mask
            None,  # record_state
            None,  # kernels
            None,  # state_kind
            d_state if need[21] else None,
        )


def _scan_forward(kernels, prefix, u, delta, A, b, c, D, z, dt_bias, token_mask):
    """The selective scan, with an initial state's prefix (:mod:`.prefix`) where there is one: (out, saved, o), o
    the gated output as an (E, b·l) matrix. u, delta, z (b, E, l); b, c (N, b·l)."""
    batch = u.shape[0]
    B, C = as_batched(b, batch), as_batched(c, batch)
    if prefix is None:
        out, saved, out_z = kernels.scan_fwd(u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, dt_bias)
        return out, saved, as_matrix(out_z)
    u, delta, B, C, z = prefix.scan_inputs(u, delta, B, C, z, token_mask)
    out, saved, out_z = kernels.scan_fwd(u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, dt_bias)
    return out, saved, prefix.cut(out_z)


def _scan_backward(kernels, prefix, u, delta, A, b, c, D, z, dt_bias, dout, saved, out, dz, token_mask):
    """The scan's backward, as :func:`_scan_forward` ran it: (du (b, E, l) laid out as u, ddelta (E, b·l), dA,
    db (N, b·l), dc (N, b·l), dD, ddt_bias, o (E, b·l) recomputed, d h⁰ or None). Writes d(z) into ``dz``."""
    batch = u.shape[0]
    B, C = as_batched(b, batch), as_batched(c, batch)
    if prefix is None:
        du, ddelta, dA, db, dc, dD, ddt_bias, out_z = kernels.scan_bwd(
            u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, dt_bias, dout, saved, out, dz
        )
        matrices = (as_matrix(ddelta), dA, as_matrix(db.squeeze(1)), as_matrix(dc.squeeze(1)))
        return du, *matrices, dD, ddt_bias, as_matrix(out_z), None
    body, n = u, prefix.length
    u, delta, B, C, z = prefix.scan_inputs(u, delta, B, C, z, token_mask)
    dz_all = torch.empty_like(z)
    du, ddelta, dA, db, dc, dD, ddt_bias, out_z = kernels.scan_bwd(
        u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, dt_bias, prefix.extend(dout, 0.0), saved, out, dz_all
    )
    dz.copy_(dz_all[..., n:])
    d_initial, dA_inputs = prefix.gradients(du[..., :n])
    ddt_bias = ddt_bias - ddelta[..., :n].float().sum((0, 2))  # the prefix's steps are constants
    du_body = torch.empty_like(body).copy_(du[..., n:])
    matrices = (prefix.cut(ddelta), dA + dA_inputs, prefix.cut(db[:, 0]), prefix.cut(dc[:, 0]))
    return du_body, *matrices, dD, ddt_bias, prefix.cut(out_z), d_initial


def _add_offset_term(o, offset, c, z) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``o += (h' C) · SiLU(z)`` in the activations' dtype (the forward's, and its recomputation in the backward);
    returns (h' in that dtype, the term h' C, SiLU(z))."""
    offset = offset.to(c.dtype)
    term, gate = torch.mm(offset, c), F.silu(z)
    o.addcmul_(term, gate)
    return offset, term, gate


def _offset_backward(offset, c, z, dout_z, o, dz, dc) -> torch.Tensor:
    """Backward of ``o += (h' C) · SiLU(z)`` (all (E, b·l) matrices, c (N, b·l)): adds the term to the recomputed
    ``o`` (what out_proj read), its parts of d(z) and d(c) to ``dz`` and ``dc``; returns d h' (fp32).

    In the activations' dtype, as the forward: each of these is a full (E, b·l) pass, which fp32 would make twice
    as many bytes; h' enters in the activations' dtype as LoRA's factors do, its gradient accumulates in fp32.
    """
    offset, term, gate = _add_offset_term(o, offset, c, z)
    dz += torch.ops.aten.silu_backward(dout_z * term, z)  # d/dz of term · SiLU(z)
    d_term = dout_z * gate
    dc += torch.mm(offset.t(), d_term).to(dc.dtype)
    return torch.mm(d_term, c.t()).float()
