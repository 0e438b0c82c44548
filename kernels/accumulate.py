"""LoRA and the bottleneck adapter on the library's own GEMMs (cuBLAS on CUDA), each with a backward of its own.

LoRA's backward accumulates each gradient in one buffer. The bottleneck adapter's (`_Bottleneck`) fuses its ReLU
into a GEMM epilogue and takes its bias gradients as GEMMs.

Why: autograd of the reference (`reference.lora_linear`) computes the input gradient of the frozen GEMM and
that of the low-rank path separately, then adds them: one more kernel and two more passes over the (M, in)
input gradient per LoRA linear, on top of everything the frozen backbone does. On an H200 at Llama-1.1B size
those adds were 2.8 ms of a 127 ms step (`bench/results/kernels_llama_inplace-h200-2026-11-30.json`: 304 bf16
adds a step against the floor's 220). Here the low-rank term is written first and the frozen GEMM accumulates
onto it (`addmm_`, cuBLAS beta=1): the frozen GEMM's epilogue does the add. Linears sharing one input (q/k/v,
gate/up) gain the most: all their input-gradient terms land in one buffer, where autograd writes each and
sums them. The LoRA scaling is folded into the rank-sized copy of A, as the Triton kernels do, so no alpha
multiply runs over an (M, r) or (out, r) tensor either way.

The arithmetic of LoRA is the reference's (same GEMMs, same order of the two terms in the forward), the signatures
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


class _Bottleneck(torch.autograd.Function):
    """(residual or x) + s * up(act(down(x))) on cuBLAS, with the ReLU in the down-projection's epilogue and a
    backward that never scales an (M, hidden) tensor.

    Why: at roberta-large size an adapter is launch-bound; autograd of the reference runs 4 kernels forward
    and 8 backward per adapter (plus one more each way when s != 1), on top of the frozen backbone. Here the
    ReLU goes into the down GEMM (cuBLASLt's bias+ReLU epilogue: `_addmm_activation`, which has no autograd
    formula of its own, hence this Function), s is applied to rank-sized tensors only, and the bias gradient
    of the up-projection comes from `_colsum`.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor | None, up_w: torch.Tensor,
                up_b: torch.Tensor | None, activation: str, residual: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = _rows(x)
            xc = x2.to(dt)
            dw, uw = down_w.to(dt), up_w.to(dt)
            db = None if down_b is None else down_b.to(dt)
            if activation == "relu" and db is not None and xc.is_cuda:
                h, pre = torch._addmm_activation(db, xc, dw.t()), None
            else:
                pre = F.linear(xc, dw, db)
                h = reference.ACTIVATIONS[activation](pre)
            up = F.linear(h, uw, None if up_b is None else up_b.to(dt))
            base = x2 if residual is None else _rows(residual)
            out = base + up if scale == 1.0 else torch.add(base, up, alpha=scale)
        ctx.save_for_backward(xc, dw, uw, h, pre)
        ctx.activation, ctx.scale, ctx.x_shape, ctx.x_dtype = activation, scale, x.shape, x.dtype
        ctx.res_dtype = None if residual is None else residual.dtype
        ctx.dtypes = (down_w.dtype, None if down_b is None else down_b.dtype, up_w.dtype,
                      None if up_b is None else up_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        xc, dw, uw, h, pre = ctx.saved_tensors
        need_x, need_dw, need_db, need_uw, need_ub, _, need_res = ctx.needs_input_grad[:7]
        dw_t, db_t, uw_t, ub_t = ctx.dtypes
        s = ctx.scale
        g = _rows(grad)
        gc = g.to(h.dtype)
        gx = gdw = gdb = guw = gub = gres = None
        if need_ub and ub_t is not None:
            gub = _scaled(_colsum(gc), s).to(ub_t)
        if need_uw:
            guw = _scaled(gc.t() @ h, s).to(uw_t)
        if need_res and ctx.res_dtype is not None:
            gres = grad.to(ctx.res_dtype)
        if need_x or need_dw or need_db:
            gh = _scaled(gc @ uw, s)  # (M, size)
            if pre is None:  # ReLU: its output's sign is the mask
                gpre = torch.ops.aten.threshold_backward(gh, h, 0)
            else:
                with torch.enable_grad():
                    p = pre.detach().requires_grad_(True)
                    gpre, = torch.autograd.grad(reference.ACTIVATIONS[ctx.activation](p), p, gh)
            if need_db and db_t is not None:
                gdb = _colsum(gpre).to(db_t)
            if need_dw:
                gdw = (gpre.t() @ xc).to(dw_t)
            if need_x:
                if ctx.res_dtype is None and g.dtype == gpre.dtype == ctx.x_dtype:
                    # a serial adapter's input is its own residual: its gradient enters as the GEMM's C
                    # (a copy and beta=1: 8.4 us, against 9.1 for the GEMM and an add, adapter_parts)
                    gx = torch.addmm(g, gpre, dw)
                else:
                    gx = (gpre @ dw).to(ctx.x_dtype)
                    gx = gx if ctx.res_dtype is not None else gx + g
                gx = gx.view(ctx.x_shape)
        return gx, gdw, gdb, guw, gub, None, gres, None


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    return t if s == 1.0 else t.mul_(s)


#: (device, dtype) -> a ones row at least as long as any gradient summed so far on it
_ONES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
#: the rows a longer one replaced: a CUDA graph captured with one reads it at every replay, so it must never be
#: freed (and its memory handed to another tensor). Each replacement at least doubles the length: few of them
_RETIRED: list[torch.Tensor] = []


def _colsum(g: torch.Tensor) -> torch.Tensor:
    """Per-column sums of an (M, n) gradient (a bias gradient), as a (1, M) ones row times it: one GEMM.

    Why: on an H200 inside a CUDA graph, `g.sum(0)` of a (4096, 1024) bf16 gradient took 10.7 us and the GEMM
    6.1 us; at (4096, 64), 7.2 against 5.6 us (bench/results/adapter_parts-h200-2026-11-30.json). The row is
    kept between calls (a graphed step's eager warm-up makes it), except one first made while a CUDA graph is
    being captured: its fill runs only when the graph replays, so an eager call before that would read garbage."""
    key = (g.device, g.dtype)
    ones = _ONES.get(key)
    if ones is None or ones.shape[1] < g.shape[0]:
        length = g.shape[0] if ones is None else max(g.shape[0], 2 * ones.shape[1])
        fresh = torch.ones(1, length, device=g.device, dtype=g.dtype)
        if not (g.is_cuda and torch.cuda.is_current_stream_capturing()):
            if ones is not None:
                _RETIRED.append(ones)
            _ONES[key] = fresh
        ones = fresh
    return (ones[:, :g.shape[0]] @ g).view(-1)


def bottleneck_adapter(x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor,
                       up_b: torch.Tensor, activation: str = "relu", residual: torch.Tensor | None = None,
                       scale: float = 1.0) -> torch.Tensor:
    """`reference.bottleneck_adapter`: ReLU fused into the down GEMM, no (M, hidden) scaling."""
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(reference.ACTIVATIONS)}")
    return _Bottleneck.apply(x, _cast(down_w, x), _cast(down_b, x), _cast(up_w, x), _cast(up_b, x), activation,
                             residual, float(scale))
