"""LoRA on the library's own GEMMs (cuBLAS on CUDA) with a backward that accumulates each gradient in one buffer.

Why: autograd of the reference (`reference.lora_linear`) computes the input gradient of the frozen GEMM and
that of the low-rank path separately, then adds them: one more kernel and two more passes over the (M, in)
input gradient per LoRA linear, on top of everything the frozen backbone does. On an H200 at Llama-1.1B size
those adds were 2.8 ms of a 127 ms step (`bench/results/kernels_llama_inplace-h200-2026-11-30.json`: 304 bf16
adds a step against the floor's 220). Here the low-rank term is written first and the frozen GEMM accumulates
onto it (`addmm_`, cuBLAS beta=1): the frozen GEMM's epilogue does the add. Linears sharing one input (q/k/v,
gate/up) gain the most: all their input-gradient terms land in one buffer, where autograd writes each and
sums them. The LoRA scaling is folded into the rank-sized copy of A, as the Triton kernels do, so no alpha
multiply runs over an (M, r) or (out, r) tensor either way.

The arithmetic is the reference's (same GEMMs, same order of the two terms in the forward), the signatures
too; no triton is needed. Under autocast the GEMMs run in autocast's dtype, as the reference's would: the
input is cast once and shared by the frozen and the low-rank GEMM. Cases these functions do not cover (a
trained base weight, LoRA dropout) go to the reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from autopeft.kernels import reference
from autopeft.kernels.lora_grads import lora_multi_grads
from autopeft.kernels.reference import _cast, _rows, compute_dtype


class _LoraMulti(torch.autograd.Function):
    """n LoRA linears on one input x: y_i = x W_i^T + b_i + (x (s_i A_i)^T) B_i^T (n = 1 for a lone linear)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, n: int, *flat: Any) -> tuple[torch.Tensor, ...]:
        ws, bs, As, Bs, scalings = (list(flat[i * n:(i + 1) * n]) for i in range(5))
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # so `_cast` casts to x2's dtype below
            x2 = _rows(x).to(dt)
            a_cat = torch.cat([a * s for a, s in zip(As, scalings, strict=True)], 0).to(dt)  # rank-sized
            xa = x2 @ a_cat.t()  # one read of x for every linear sharing it, already scaled
            ws_c = [w.to(dt) for w in ws]
            Bs_c = [B.to(dt) for B in Bs]
            outs, start = [], 0
            for w, bias, B in zip(ws_c, bs, Bs_c, strict=True):
                r = B.shape[1]
                y = F.linear(x2, w, _cast(bias, x2)).addmm_(xa[:, start:start + r], B.t())
                outs.append(y.view(*x.shape[:-1], y.shape[-1]))
                start += r
        ctx.save_for_backward(x2, xa, a_cat, *ws_c, *Bs_c)
        ctx.n, ctx.scalings, ctx.x_shape, ctx.ranks = n, scalings, x.shape, [a.shape[0] for a in As]
        ctx.dtypes = [(a.dtype, B.dtype, None if bias is None else bias.dtype)
                      for a, B, bias in zip(As, Bs, bs, strict=True)]
        ctx.set_materialize_grads(False)  # an output that did not reach the loss costs nothing in backward
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        n = ctx.n
        x2, xa, a_cat, *rest = ctx.saved_tensors
        ws, Bs_c = rest[:n], rest[n:]
        needs = ctx.needs_input_grad  # x, n, ws..., bs..., As..., Bs..., scalings...
        gbias, gA, gB, terms, low, rows = lora_multi_grads(grads, needs, x2, xa, a_cat, ws, Bs_c, ctx.ranks,
                                                          ctx.scalings, ctx.dtypes)
        gx = None
        if needs[0] and terms:
            # every low-rank term as one (M, sum r) @ (sum r, in) product, then each frozen GEMM accumulates
            # onto it in its epilogue (beta=1): no separate add, whatever the number of linears sharing x
            gx = torch.cat(low, 1) @ torch.cat(rows, 0) if len(low) > 1 else low[0] @ rows[0]
            for g, w in terms:
                gx.addmm_(g, w)
            gx = gx.view(ctx.x_shape)
        return (gx, None, *([None] * n), *gbias, *gA, *gB, *([None] * n))


def _covered(ws: list[torch.Tensor]) -> bool:
    return not any(w.requires_grad for w in ws)


def lora_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """`reference.lora_linear`, its input gradient accumulated in the frozen GEMM's epilogue."""
    if (dropout and training) or not _covered([w]):
        return reference.lora_linear(x, w, b, A, B, scaling, dropout, training)
    return _LoraMulti.apply(x, 1, w, b, A, B, float(scaling))[0]


def lora_linear_multi(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None], As: list[torch.Tensor],
                      Bs: list[torch.Tensor], scalings: list[float]) -> list[torch.Tensor]:
    """`reference.lora_linear_multi`: one x A^T for all, the input gradients of all in one buffer."""
    n = len(ws)
    if not (len(bs) == len(As) == len(Bs) == len(scalings) == n):
        raise ValueError("lora_linear_multi: ws, bs, As, Bs and scalings must have the same length")
    if not _covered(ws):
        return reference.lora_linear_multi(x, ws, bs, As, Bs, scalings)
    return list(_LoraMulti.apply(x, n, *ws, *bs, *As, *Bs, *[float(s) for s in scalings]))
