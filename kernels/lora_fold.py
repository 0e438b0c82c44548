"""LoRA folded into the frozen weight for the step: y = x (W + s B A)^T + b, the low-rank update added to a copy
of W (one rank-r GEMM, W' = addmm(W, B, A, alpha=s)) and the linear run as the frozen floor runs it.

Why: at encoder sizes a LoRA step is made of small kernels. Applied to the activations, every LoRA linear adds
a low-rank GEMM and an accumulating GEMM over its output forward, and backward a low-rank GEMM and an add (or an
accumulating GEMM) into the input gradient: on an H200 a graphed roberta-large-size step with LoRA r8 on all 144
linears ran 1.64x the frozen floor (bench/results/kernels_ia3_fold_all-h200-2026-11-30.json), where the issue
asks 1.25x. Folded, the forward and the input gradient are the floor's own GEMMs with W' (the low-rank path is
in W'), and what LoRA adds is W' itself (out x in, small beside the activations: one Triton kernel, `fold_weights`)
and, backward, the four skinny GEMMs that give A's and B's gradients:
    xa = x A^T,  gb = g B,  dA = s gb^T x,  dB = s g^T xa.
Linears reading one input (q, k, v: `lora_linear_multi`) share one `x [A_q; A_k; A_v]^T` and one GEMM for their
A's gradients, and their input gradient accumulates in place, GEMM after GEMM (no add kernels, which the floor
itself pays).

Numerics: W' is rounded to the compute dtype, so in bf16 the forward sees s B A rounded onto W's grid (unbiased
where W's values fall at random in their rounding interval, as rounding the frozen weight itself is) rather than
added exactly; the gradients of A and B are the exact formulas above. tests/kernels/test_lora.py holds it
to the fp64 reference within the kernels' tolerance. LoRA dropout (a mask on the low-rank path's input only)
has no folded form: it stays on the other paths (`supported`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from autopeft.kernels import casts, lowrank_grads
from autopeft.kernels.gemm import INTERPRET

#: A's and B's gradients by `lowrank_grads` (three Triton launches per input) rather than four cuBLAS GEMMs and
#: their split-K reduces per linear; bench/kernels.py's ours_cublasgrads_* arm turns it off to compare
FUSED_GRADS = True
#: the fold kernel's tile (rows, columns) and warps: the fastest or within 0.1 us of it at every shape of the
#: issue's two models (bench/results/lora_fold_parts-h200-2026-11-30.json)
FOLD_TILES = (64, 64, 4)
#: B A on the tensor cores for bf16/fp16 adapters: 12.1 against 18.6 us for a Llama-1.1B FFN weight, 2.4 against
#: 3.1 us at 1,024 x 1,024, a copy of W taking 10.8 and 1.7 (lora_fold_parts_knobs-h200-2026-11-30.json). The
#: interpreter's bf16 `tl.dot` is wrong, so never there
FOLD_TENSOR_CORES = True


@triton.jit
def _fold_tile(W, A, B, WO, BT, N, K, R, s, RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               TC: tl.constexpr, WRITE_BT: tl.constexpr):
    """W' = W + s B A over one (BN, BK) tile: W read once and W' written once, B's (BN, r) and A's (r, BK) tiles
    multiplied in one fp32 `tl.dot` (r padded to RP >= 16 with zeros), where `torch.addmm(W, B, A)` first copies W and
    then reads and writes it again. WRITE_BT: the first column of tiles also writes B^T (r, N), which
    `lowrank_grads`'s row pass reads faster than B, for the cost of an (r, N) store."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, RP)
    rmask, cmask, kmask = rows < N, cols < K, ranks < R
    b = tl.load(B + rows[:, None] * R + ranks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    a = tl.load(A + ranks[:, None] * K + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
    if WRITE_BT:
        if tl.program_id(1) == 0:
            tl.store(BT + ranks[None, :] * N + rows[:, None], b, mask=rmask[:, None] & kmask[None, :])
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    if TC:  # bf16/fp16 operands on the tensor cores: their products are exact in the fp32 accumulator
        low = tl.dot(b, a)
    else:  # tiny: r x BN x BK FMAs
        low = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32) + s * low
    tl.store(WO + offs, w.to(WO.dtype.element_ty), mask=mask)


@triton.jit
def _fold_weights(W0, W1, W2, A0, A1, A2, B0, B1, B2, WO0, WO1, WO2, BT0, BT1, BT2, N0, N1, N2, K, R0, R1, R2,
                  S0, S1, S2, RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TC: tl.constexpr,
                  WRITE_BT: tl.constexpr):
    """Up to three folds on one input (q, k, v) in one launch, the third grid axis picking the weight; each
    weight's pointers go straight to its tile (`_fold_tile`), none selected at run time (see
    lowrank_grads._row_pass), and a narrower weight's surplus row blocks (GQA's k and v) return at once."""
    i = tl.program_id(2)
    first = tl.program_id(0) * BN
    if i == 0:
        _fold_tile(W0, A0, B0, WO0, BT0, N0, K, R0, S0, RP, BN, BK, TC, WRITE_BT)
    elif i == 1:
        if first < N1:
            _fold_tile(W1, A1, B1, WO1, BT1, N1, K, R1, S1, RP, BN, BK, TC, WRITE_BT)
    elif first < N2:
        _fold_tile(W2, A2, B2, WO2, BT2, N2, K, R2, S2, RP, BN, BK, TC, WRITE_BT)


@triton.jit
def _fold_stack(W, A, B, WO, N, K, R, s, RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TC: tl.constexpr):
    """One fold of the shared W per program along the grid's third axis: a pack's trials at one site."""
    k = tl.program_id(2).to(tl.int64)
    _fold_tile(W, A + k * R * K, B + k * N * R, WO + k * N * K, WO, N, K, R, s, RP, BN, BK, TC, False)


def fold_stack(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype, *,
               tiles: tuple[int, int, int] = FOLD_TILES) -> torch.Tensor:
    """W + scaling * B_k @ A_k for every k, [S, N, K] in `dtype`, one launch: w [N, K] shared, A [S, r, K],
    B [S, N, r]. For `grouped_fold`, where `torch.baddbmm` from the broadcast W first copies W into each of the S
    outputs and then reads them back (7.8 ms of a pack's step, bench/results/packing_step_fold_torch-; 2.1 ms so)."""
    stacks, n, k = A.shape[0], w.shape[0], w.shape[1]
    bn, bk, warps = tiles
    tc = (FOLD_TENSOR_CORES and A.dtype == B.dtype and A.dtype in (torch.bfloat16, torch.float16)
          and not INTERPRET)
    out = torch.empty(stacks, n, k, dtype=dtype, device=w.device)
    rank = A.shape[1]
    _fold_stack[(triton.cdiv(n, bn), triton.cdiv(k, bk), stacks)](
        w.contiguous(), A.contiguous(), B.contiguous(), out, n, k, rank, float(scaling),
        RP=max(16, triton.next_power_of_2(rank)), BN=bn, BK=bk, TC=tc, num_warps=warps)
    return out


def fold_weights(ws: Sequence[torch.Tensor], As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                 scalings: Sequence[float], dtype: torch.dtype, *, tiles: tuple[int, int, int] = FOLD_TILES,
                 tensor_cores: bool | None = None, transposed_Bs: list[torch.Tensor] | None = None
                 ) -> list[torch.Tensor]:
    """W_i + scaling_i * B_i @ A_i in `dtype` for up to three weights of one input width, one launch (one a
    linear before: 144 folds a roberta-large-size step, where 96 do with q, k and v together). `tiles` (rows,
    columns, warps) and `tensor_cores` (B A on the tensor cores, default where A and B are bf16 or fp16) are
    parameters so bench/profile/lora_fold_parts.py can time the choices. Given a list, `transposed_Bs` gets each
    B_i^T, contiguous, made in the same launch."""
    n = len(ws)
    k = ws[0].shape[1]
    bn, bk, warps = tiles
    if tensor_cores is None:
        tensor_cores = FOLD_TENSOR_CORES
    tc = (tensor_cores and all(A.dtype == B.dtype == As[0].dtype for A, B in zip(As, Bs, strict=True))
          and As[0].dtype in (torch.bfloat16, torch.float16) and not INTERPRET)
    outs = [torch.empty(w.shape[0], k, dtype=dtype, device=w.device) for w in ws]
    bts = [] if transposed_Bs is None else [torch.empty(B.shape[1], B.shape[0], dtype=B.dtype, device=B.device)
                                             for B in Bs]
    if transposed_Bs is not None:
        transposed_Bs.extend(bts)

    ns = [w.shape[0] for w in ws]
    ranks = [A.shape[0] for A in As]
    grid = (triton.cdiv(max(ns), bn), triton.cdiv(k, bk), n)
    slots = lowrank_grads.slots
    _fold_weights[grid](*slots([w.contiguous() for w in ws], ws[0]), *slots([A.contiguous() for A in As], As[0]),
                        *slots([B.contiguous() for B in Bs], Bs[0]), *slots(outs, outs[0]),
                        *slots(bts, outs[0]), *slots(ns, 0), k, *slots(ranks, 0),
                        *slots([float(s) for s in scalings], 0.0), RP=max(16, triton.next_power_of_2(max(ranks))),
                        BN=bn, BK=bk, TC=tc, WRITE_BT=bool(bts), num_warps=warps)
    return outs


def fold_weight(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype, *,
                tiles: tuple[int, int, int] = FOLD_TILES, tensor_cores: bool | None = None) -> torch.Tensor:
    """`fold_weights` of one weight."""
    return fold_weights([w], [A], [B], [scaling], dtype, tiles=tiles, tensor_cores=tensor_cores)[0]


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float, like: torch.Tensor) -> torch.Tensor:
    """alpha * a @ b in one GEMM (cuBLAS's alpha): addmm with beta=0 never reads its input, so `like`, anything
    broadcasting to the result, costs nothing (a zeros tensor would cost a fill kernel per call)."""
    return torch.addmm(like, a, b, beta=0, alpha=alpha)


class _FoldedLora(torch.autograd.Function):
    """n linears on one input x: y_i = x (W_i + s_i B_i A_i)^T + b_i. Arguments after x and the scalings: the n
    weights, the n biases (None allowed), the n A's, the n B's, A's and B's already in x's dtype. Up to
    MAX_LINEARS of them (one fold launch), the fold also writes each B^T where a backward will run, which keeps
    it instead of B for `lowrank_grads` (an (r, N) tensor: where B was a cast, the same bytes; where B is the
    parameter itself, a copy the size of B)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scalings: tuple[float, ...], *params: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        n = len(scalings)
        ws, bs, As, Bs = params[:n], params[n:2 * n], params[2 * n:3 * n], params[3 * n:]
        x2 = x.reshape(-1, x.shape[-1])
        bts: list[torch.Tensor] = []
        if n <= lowrank_grads.MAX_LINEARS:  # B^T only for a backward (not under no_grad or in evaluation)
            wanted = bts if any(ctx.needs_input_grad) else None
            folds = fold_weights(ws, As, Bs, scalings, x.dtype, transposed_Bs=wanted)
        else:
            folds = [fold_weight(w, A, B, s, x.dtype) for w, A, B, s in zip(ws, As, Bs, scalings, strict=True)]
        ys = [F.linear(x2, wf, None if b is None else b.to(x.dtype)) for wf, b in zip(folds, bs, strict=True)]
        ctx.save_for_backward(x2, *folds, *As, *(bts or Bs))  # the backward's B's are views of the B^T's
        ctx.transposed = bool(bts)
        ctx.scalings, ctx.x_shape = scalings, x.shape
        ctx.bias_dtypes = [None if b is None else b.dtype for b in bs]
        ctx.set_materialize_grads(False)  # an output that did not reach the loss costs no zero-filled GEMMs
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        scalings = ctx.scalings
        n = len(scalings)
        x2, saved = ctx.saved_tensors[0], ctx.saved_tensors[1:]
        folds, As, Bs = saved[:n], saved[n:2 * n], saved[2 * n:]
        Bts = Bs
        if ctx.transposed:  # up to MAX_LINEARS, as `lowrank_grads` takes them
            Bs = [bt.t() for bt in Bts]
        needs = ctx.needs_input_grad
        need_b = needs[2 + n:2 + 2 * n]
        need_A, need_B = needs[2 + 2 * n:2 + 3 * n], needs[2 + 3 * n:2 + 4 * n]
        live = [i for i in range(n) if grads[i] is not None]
        gs = {i: grads[i].reshape(-1, grads[i].shape[-1]).to(x2.dtype) for i in live}
        gx = None
        gbias: list[torch.Tensor | None] = [None] * n
        for i in live:
            if needs[0]:
                gx = gs[i] @ folds[i] if gx is None else gx.addmm_(gs[i], folds[i])
            if need_b[i] and ctx.bias_dtypes[i] is not None:  # BitFit trains the base bias alongside LoRA
                gbias[i] = gs[i].sum(0, dtype=torch.float32).to(ctx.bias_dtypes[i])
        if FUSED_GRADS and all(need_A) and all(need_B) and lowrank_grads.supported(x2, grads, As):
            gA, gB = lowrank_grads.lowrank_grads(x2, [gs[i] for i in range(n)], As, Bts, scalings)
        else:
            gA, gB = _cublas_grads(x2, gs, As, Bs, scalings, need_A, need_B)
        if gx is not None:
            gx = gx.view(ctx.x_shape)
        elif needs[0]:
            gx = x2.new_zeros(ctx.x_shape)  # no output reached the loss
        return gx, None, *([None] * n), *gbias, *gA, *gB


def _cublas_grads(x2: torch.Tensor, gs: dict[int, torch.Tensor], As: Sequence[torch.Tensor],
                  Bs: Sequence[torch.Tensor], scalings: Sequence[float], need_A: Sequence[bool],
                  need_B: Sequence[bool]) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """A's and B's gradients as cuBLAS GEMMs, for the linears whose output reached the loss (`gs`): one x A^T for
    them all, one g B each, one GEMM for the A gradients where they share a scaling (LoRA's alpha as a multiple
    of the rank: always), the scaling in each GEMM's alpha."""
    n = len(As)
    gA: list[torch.Tensor | None] = [None] * n
    gB: list[torch.Tensor | None] = [None] * n
    live = list(gs)
    starts = [0]
    for A in As:
        starts.append(starts[-1] + A.shape[0])
    xa = None
    if any(need_B[i] for i in live):
        xa = x2 @ (As[0] if n == 1 else torch.cat(list(As), 0)).t()
    shared_A = len(set(scalings)) == 1 and len(live) > 1 and all(need_A[i] for i in live)
    gbs = []
    for i in live:
        if need_A[i]:
            gb = gs[i] @ Bs[i]
            if shared_A:
                gbs.append(gb)
            else:
                gA[i] = _scaled_mm(gb.t(), x2, scalings[i], x2[0])
        if need_B[i]:
            gB[i] = _scaled_mm(gs[i].t(), xa[:, starts[i]:starts[i + 1]], scalings[i], xa[0, :As[i].shape[0]])
    if gbs:
        ga_cat = _scaled_mm(torch.cat(gbs, 1).t(), x2, scalings[0], x2[0])
        for i, part in zip(live, ga_cat.split([As[i].shape[0] for i in live], 0), strict=True):
            gA[i] = part
    return gA, gB


def supported(dtype: torch.dtype, ws: Sequence[torch.Tensor], dropout: float = 0.0) -> bool:
    """Where the fold computes what the reference does: frozen weights (a trained W needs its own gradient), no
    LoRA dropout, a floating compute dtype."""
    return dtype.is_floating_point and not dropout and not any(w.requires_grad for w in ws)


def _apply(x: torch.Tensor, ws: Sequence[torch.Tensor], bs: Sequence[torch.Tensor | None], As: Sequence[torch.Tensor],
           Bs: Sequence[torch.Tensor], scalings: Sequence[float]) -> tuple[torch.Tensor, ...]:
    dtype = casts.compute_dtype(x)
    return _FoldedLora.apply(x.to(dtype), tuple(float(s) for s in scalings), *ws, *bs,
                             *(casts.cast(A, dtype) for A in As), *(casts.cast(B, dtype) for B in Bs))


def lora_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """`reference.lora_linear` with the update folded into the weight; the reference where the fold does not
    apply (LoRA dropout while training, a trained weight)."""
    if not supported(casts.compute_dtype(x), [w], dropout if training else 0.0):
        from autopeft.kernels import reference

        return reference.lora_linear(x, w, b, A, B, scaling, dropout, training)
    return _apply(x, [w], [b], [A], [B], [scaling])[0]


def lora_linear_multi(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None], As: list[torch.Tensor],
                      Bs: list[torch.Tensor], scalings: list[float]) -> list[torch.Tensor]:
    """`reference.lora_linear_multi` folded: one W' per linear, one x A^T for all of them in backward."""
    if not supported(casts.compute_dtype(x), ws):
        from autopeft.kernels import reference

        return reference.lora_linear_multi(x, ws, bs, As, Bs, scalings)
    return list(_apply(x, ws, bs, As, Bs, scalings))
