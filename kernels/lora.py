"""LoRA, multi-LoRA (q/k/v sharing one input) and DoRA on the fused GEMM, forward and backward.

Why this split of work: the two big GEMMs of a frozen linear (x W^T forward, g W backward) run in the fused
kernel with the low-rank term accumulated into the same tile, so the (M, out) / (M, in) tensors are written
once. The products that involve the rank only (x A^T, g B, and the parameter gradients, reductions over M)
are small and stay with cuBLAS, which is as good as anything at those shapes. The scaling is folded into the
rank-sized cast copy of A, so it costs nothing per element of the activations.
"""

from __future__ import annotations

from typing import Any

import torch

from autopeft.kernels.gemm import AUX_BEFORE_SCALE, AUX_NONE, fused_gemm, lowrank_row_norm
from autopeft.kernels.lora_grads import lora_multi_grads
from autopeft.kernels.reference import _rows


def _param_grad(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if g is None else g.to(like.dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, dropout: float, training: bool) -> torch.Tensor:
        x2 = _rows(x)
        a_s = (A * scaling).to(x.dtype)  # rank-sized: folding the scaling here is free
        mask = None
        xd = x2
        if dropout and training:
            # one mask, for the low-rank path only; the frozen GEMM always sees the clean input (as HF PEFT)
            mask = torch.empty_like(x2).bernoulli_(1.0 - dropout)
            mask = mask.to(torch.bool)
            xd = x2 * mask / (1.0 - dropout)
        xa = xd @ a_s.t()  # (M, r), already scaled
        y, _ = fused_gemm(x2, w.t(), lr=xa, lb=B.t(), bias=b)
        ctx.save_for_backward(x2 if mask is None else xd, w, A, B, xa, mask)
        ctx.scaling, ctx.dropout, ctx.x_shape = scaling, dropout, x.shape
        ctx.b_dtype = None if b is None else b.dtype
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        xd, w, A, B, xa, mask = ctx.saved_tensors
        need_x, _, need_b, need_a, need_bb = ctx.needs_input_grad[:5]  # w never: trained weights go to the reference
        s = ctx.scaling
        g = _rows(grad).to(xd.dtype)
        gx = gw = gbias = ga = gB = None
        gb = g @ B.to(g.dtype) if (need_x or need_a) else None  # (M, r)
        if need_x:
            a_s = (A * s).to(g.dtype)
            if mask is None:
                gx, _ = fused_gemm(g, w, lr=gb, lb=a_s)
            else:
                gx, _ = fused_gemm(g, w)
                gx = gx + (gb @ a_s) * mask / (1.0 - ctx.dropout)
            gx = gx.reshape(ctx.x_shape)
        if need_b and ctx.b_dtype is not None:  # BitFit trains the base bias alongside LoRA
            gbias = g.sum(0, dtype=torch.float32).to(ctx.b_dtype)
        if need_a:
            ga = s * (gb.t() @ xd)
        if need_bb:
            gB = g.t() @ xa
        return gx, gw, gbias, _param_grad(ga, A), _param_grad(gB, B), None, None, None


def lora_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """y = x W^T + b + scaling * dropout(x) A^T B^T in one GEMM kernel (the low-rank term in its K-loop)."""
    if w.requires_grad:  # a trained base weight needs the plain autograd graph
        from autopeft.kernels import reference

        return reference.lora_linear(x, w, b, A, B, scaling, dropout, training)
    return _LoraLinear.apply(x, w, b, A, B, float(scaling), float(dropout), bool(training))


class _LoraLinearMulti(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, n: int, *flat: Any) -> tuple[torch.Tensor, ...]:
        ws, bs, As, Bs, scalings = (list(flat[i * n:(i + 1) * n]) for i in range(5))
        x2 = _rows(x)
        a_cat = torch.cat([(a * s).to(x.dtype) for a, s in zip(As, scalings)], 0)
        xa = x2 @ a_cat.t()  # one read of x for every projection sharing it
        outs, start = [], 0
        for w, b, a, bb in zip(ws, bs, As, Bs):
            r = a.shape[0]
            y, _ = fused_gemm(x2, w.t(), lr=xa[:, start:start + r], lb=bb.t(), bias=b)
            outs.append(y.reshape(*x.shape[:-1], w.shape[0]))
            start += r
        ctx.save_for_backward(x2, xa, a_cat, *ws, *As, *Bs)
        ctx.n, ctx.scalings, ctx.x_shape = n, scalings, x.shape
        ctx.set_materialize_grads(False)  # an unused projection's output costs no zero-filled GEMM
        ctx.b_dtypes = [None if b is None else b.dtype for b in bs]
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        n = ctx.n
        x2, xa, a_cat, *rest = ctx.saved_tensors
        ws, As, Bs = rest[:n], rest[n:2 * n], rest[2 * n:]
        needs = ctx.needs_input_grad
        dtypes = [(a.dtype, b.dtype, bias) for a, b, bias in zip(As, Bs, ctx.b_dtypes, strict=True)]
        gbs, gAs, gBs, gs, gbs_low, a_rows = lora_multi_grads(grads, needs, x2, xa, a_cat, ws, Bs,
                                                              [a.shape[0] for a in As], ctx.scalings, dtypes)
        gx = None
        if needs[0] and gs:
            # every projection's low-rank input gradient as one (M, sum r) @ (sum r, in) product in the first
            # GEMM's K-loop; the running sum then rides into the next GEMM as its residual
            for j, (g, w) in enumerate(gs):
                if j == 0:
                    gx, _ = fused_gemm(g, w, lr=torch.cat(gbs_low, 1), lb=torch.cat(a_rows, 0))
                else:
                    gx, _ = fused_gemm(g, w, residual=gx)
            gx = gx.reshape(ctx.x_shape)
        return (gx, None, *([None] * n), *gbs, *gAs, *gBs, *([None] * n))


def lora_linear_multi(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None], As: list[torch.Tensor],
                      Bs: list[torch.Tensor], scalings: list[float]) -> list[torch.Tensor]:
    """Several LoRA linears on one input (q, k, v): x A^T computed once for all, each GEMM fused as lora_linear."""
    if any(w.requires_grad for w in ws):
        from autopeft.kernels import reference

        return reference.lora_linear_multi(x, ws, bs, As, Bs, scalings)
    n = len(ws)
    if not (len(bs) == len(As) == len(Bs) == len(scalings) == n):
        raise ValueError("lora_linear_multi: ws, bs, As, Bs and scalings must have the same length")
    return list(_LoraLinearMulti.apply(x, n, *ws, *bs, *As, *Bs, *[float(s) for s in scalings]))


class _DoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
        x2 = _rows(x)
        norm = lowrank_row_norm(w, B, A, scaling)  # detached, as in the paper and HF PEFT
        col = magnitude.to(torch.float32) / norm
        a_s = (A * scaling).to(x.dtype)
        xa = x2 @ a_s.t()
        need_m = ctx.needs_input_grad[5]
        y, z = fused_gemm(x2, w.t(), lr=xa, lb=B.t(), col_scale=col, bias=b,
                          aux_stage=AUX_BEFORE_SCALE if need_m else AUX_NONE)
        ctx.save_for_backward(x2, w, A, B, xa, col, norm, z)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        ctx.b_dtype = None if b is None else b.dtype
        ctx.m_dtype = magnitude.dtype
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x2, w, A, B, xa, col, norm, z = ctx.saved_tensors
        need_x, _, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
        s = ctx.scaling
        g = _rows(grad).to(x2.dtype)
        gx = gbias = ga = gB = gm = None
        gb = g @ (B * col[:, None]).to(g.dtype) if (need_x or need_a) else None  # (g ⊙ col) B, (M, r)
        if need_x:
            # the column scale is applied to g as the kernel's prologue: g ⊙ col is never materialised
            gx, _ = fused_gemm(g, w, in_scale=col, lr=gb, lb=(A * s).to(g.dtype))
            gx = gx.reshape(ctx.x_shape)
        if need_b and ctx.b_dtype is not None:
            gbias = g.sum(0, dtype=torch.float32).to(ctx.b_dtype)
        if need_a:
            ga = s * (gb.t() @ x2)
        if need_bb:
            gB = (g.t() @ xa).to(torch.float32) * col[:, None]
        if need_m:
            gm = ((g * z).sum(0, dtype=torch.float32) / norm).to(ctx.m_dtype)
        return gx, None, gbias, _param_grad(ga, A), _param_grad(gB, B), gm, None


def dora_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA with its row norm computed by a kernel that never builds W + sBA, and the magnitude applied in the
    GEMM epilogue."""
    if w.requires_grad:
        from autopeft.kernels import reference

        return reference.dora_linear(x, w, b, A, B, magnitude, scaling)
    return _DoraLinear.apply(x, w, b, A, B, magnitude, float(scaling))
