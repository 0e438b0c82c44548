"""A's and B's gradients of up to three LoRA linears reading one input, in two Triton launches:
    xa = x [A_1; ...; A_n]^T,  gb_i = g_i B_i,  dA_i = s_i gb_i^T x,  dB_i = s_i g_i^T xa_i.

Why: folded into the weight (`lora_fold`), a LoRA linear's forward and input gradient are the frozen floor's
own GEMMs, and what LoRA still adds is these four skinny products. As cuBLAS GEMMs they are two GEMMs over
rows and two split-K GEMMs, each with its reduce kernel: for q, k and v at roberta-large size (4,096 rows,
1,024 features, rank 8) twelve kernels, about 47 us, where reading x and the three g twice takes about 15 us
(bench/results/lora_fold_parts-h200-2026-11-30.json: x A^T 3.7 us, g B 4.8, each split-K GEMM 7.2). Here
22 us (`_grads_lowrank_bt` in lora_fold_parts_bt-h200-2026-11-30.json):
- `_row_pass`: one launch for x A^T of all the linears (A's stacked) and every g_i B_i (read from B_i^T, which
  `lora_fold.fold_weights` writes as it folds), row blocks by job;
- `_col_pass`: one launch for every column of both reductions, dA's over x's columns and dB's over each g's,
  the rows split so at least MIN_PROGRAMS programs run, each writing fp32 partial sums; the last split of a
  column block to finish adds them up, scales them and casts them into the gradients (`FINISH_IN_COLS`;
  else `_finish`, a third launch, does).
Deterministic (fixed splits, summed in split order, no atomics on values), in x's dtype as cuBLAS's would be,
accumulated in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from autopeft.kernels.gemm import INTERPRET as _INTERPRET
from autopeft.kernels.partials import row_split

#: the stacked ranks the kernels take (their tiles hold RP = next power of two >= 16 of them); above, cuBLAS
MAX_RANKS = 64
MAX_LINEARS = 3
#: The tiles and splits, from bench/profile/lora_fold_parts.py's sweep on an H200 (lora_fold_parts_direct-h200-
#: 2026-11-30.json, rank 8): row blocks of ROW_BM rows (ROW_BM_QKV for three linears, whose four jobs already give
#: enough programs: q, k, v 29.1 against 32.3 us at roberta-large size), the row pass's reduction in steps of
#: ROW_BK columns, WIDE_BK for a source ROW_WIDE or more columns wide (1,024 -> 4,096: 36.1 against 42.7 us;
#: 4,096 -> 1,024: 27.4 against 30.8), FINISH_BLOCK partial sums a program in `_finish` (1,024: 16.6 against
#: 15.0 us at 1,024 x 1,024, too few programs; where `FINISH_IN_COLS` is off), MIN_PROGRAMS for the column pass
#: (with the finish in the column pass, 528 beat 264 by 0.3 to 2.4 us at all nine shapes in lora_fold_parts_
#: finish-h200-2026-11-30.json; with `_finish` apart, 264 had been the faster: its partial sums are fewer)
ROW_BM, ROW_BM_QKV, ROW_BK, WIDE_BK, ROW_WIDE = 32, 64, 128, 256, 4096
#: WIDE_BK only where a pipeline stage's two tiles, (BM + RP) x WIDE_BK elements, take at most this many bytes:
#: Triton 3.6 asked 240 KiB of shared memory, over an H200's 227, for 64 rows, rank 8 and 256 columns
WIDE_STAGE_BYTES = 24 * 1024
COL_BM, COL_BC = 64, 64
FINISH_BLOCK = 256
MIN_PROGRAMS = 528
#: how many of the three launches run: less only to time the first ones alone (bench/profile/lora_fold_parts.py)
PASSES = 3
#: the column pass's last program per column block writes the gradients (`_last_to_arrive`), not `_finish`:
#: one launch fewer per call (96 a roberta-large-size step). Alone, in a graph of 50 calls, no faster than the
#: launch apart (lora_fold_parts_finish-h200-2026-11-30.json, `sepfinish`), but its finer splits are (above)
FINISH_IN_COLS = True
INTERPRET: tl.constexpr = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """fp32 operands in full precision (IEEE), others on the tensor cores; under the CPU interpreter, whose bf16
    `tl.dot` multiplies raw bits (see gemm.py), in fp32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _rows_times(src, w, rows, rmask, C, R, sj, RP: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """src[rows, :C] w in fp32, w's element (c, j) at c + j * sj (an A or a B^T, rows of C), its columns from R
    on zeros."""
    jj = tl.arange(0, RP)
    jmask = jj < R
    acc = tl.zeros([rows.shape[0], RP], dtype=tl.float32)
    for c0 in range(0, C, BK):
        cols = c0 + tl.arange(0, BK)
        cmask = cols < C
        a = tl.load(src + rows[:, None].to(tl.int64) * C + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        b = tl.load(w + cols[:, None] + jj[None, :] * sj, mask=cmask[:, None] & jmask[None, :], other=0.0)
        acc += _dot(a, b, IEEE)
    return acc


@triton.jit
def _store_cols(out, acc, rows, rmask, off, R, RP: tl.constexpr):
    """out[rows, off : off + R] = acc[:, :R], out's rows RP wide."""
    jj = tl.arange(0, RP)
    tl.store(out + rows[:, None].to(tl.int64) * RP + (off + jj)[None, :], acc.to(out.dtype.element_ty),
             mask=rmask[:, None] & (jj < R)[None, :])


@triton.jit
def _row_pass(X, ACAT, G0, G1, G2, BT0, BT1, BT2, XA, GB, M, K, N0, N1, N2, RSUM, R0, R1, R2, O1, O2,
              RP: tl.constexpr, BM: tl.constexpr, BKX: tl.constexpr, BKG: tl.constexpr, IEEE: tl.constexpr):
    """Job 0: XA[rows, :RP] = x A_cat^T (A_cat is (RSUM, K), so columns from RSUM on are zeros); job 1 + i:
    GB[rows, O_i : O_i + R_i] = g_i B_i, from B_i^T (R_i, N_i), which the fold writes (`lora_fold.fold_weights`).
    Why B^T: read as B, (N_i, R_i), a run-time R_i apart, a tile's rows were loaded an element at a time (32
    loads a thread a step over 256 columns), and the 4,096-wide g B at roberta-large size took 21.1 us where
    x A^T over as wide an x took 11.4; read as B^T, as A is, 13.6 (rows only; lora_fold_parts_bt-h200-
    2026-11-30.json). Each job's pointers and strides go straight to its loop (`_rows_times`): selected at run
    time into one loop, as an earlier version did, they cost the loads their known alignment, it seems, and the
    pass ran at half the speed (4,096 x 4,096 -> 1,024 at rank 8: 25.4 against 13.8 us; q, k and v at
    roberta-large size 21.4 against 16.4; lora_fold_parts-h200-2026-11-30.json's `rows_only_select` cases in
    the run of lora_fold_parts_direct-h200-2026-11-30.json)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    job = tl.program_id(1)
    if job == 0:  # all of XA's RP columns (A_cat's missing rows give zeros), and zeros in GB's unused ones
        _store_cols(XA, _rows_times(X, ACAT, rows, rmask, K, RSUM, K, RP, BKX, IEEE), rows, rmask, 0, RP, RP)
        jj = tl.arange(0, RP)
        tl.store(GB + rows[:, None].to(tl.int64) * RP + jj[None, :], tl.zeros([BM, RP], dtype=GB.dtype.element_ty),
                 mask=rmask[:, None] & (jj >= RSUM)[None, :])
    elif job == 1:
        _store_cols(GB, _rows_times(G0, BT0, rows, rmask, N0, R0, N0, RP, BKG, IEEE), rows, rmask, 0, R0, RP)
    elif job == 2:
        _store_cols(GB, _rows_times(G1, BT1, rows, rmask, N1, R1, N1, RP, BKG, IEEE), rows, rmask, O1, R1, RP)
    else:
        _store_cols(GB, _rows_times(G2, BT2, rows, rmask, N2, R2, N2, RP, BKG, IEEE), rows, rmask, O2, R2, RP)


@triton.jit
def _rank_scale(j, O1, O2, S0, S1, S2):
    """The scaling of A_cat's row j: its rows are linear 0's, then 1's from O1, then 2's from O2."""
    return tl.where(j < O1, S0, tl.where(j < O2, S1, S2))


@triton.jit
def _sum_splits(P, offs, mask, SPLITS, TOTAL):
    """Σ over the splits' partial sums at `offs` (past L1, which another SM's stores do not reach)."""
    total = tl.zeros(offs.shape, dtype=tl.float32)
    for i in range(0, SPLITS):
        total += tl.load(P + i * TOTAL + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _last_to_arrive(CNT, cb, SPLITS):
    """Whether this program is the last of column block cb's SPLITS to have stored its partial sums: a ticket
    from the block's counter, taken after a barrier (every thread's stores before it, as split-K's serial
    reductions do), with acquire-release ordering; the last one resets the counter for the next call."""
    tl.debug_barrier()
    ticket = tl.atomic_add(CNT + cb, 1, sem="acq_rel")
    last = ticket == SPLITS - 1
    if last:
        tl.atomic_xchg(CNT + cb, 0)
    return last


@triton.jit
def _col_pass(X, XA, GB, G0, G1, G2, P, M, K, N0, N1, N2, rows_per, NA, NB0, NB1, TOTAL, BASE0, BASE1, BASE2,
              CNT, SPLITS, GA, GB0, GB1, GB2, RSUM, R0, R1, R2, O1, O2, S0, S1, S2,
              RP: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, IEEE: tl.constexpr, FINISH: tl.constexpr):
    """Column block cb over this split's rows, into P[split]: cb < NA: P[j * K + c] = Σ_m GB[m, j] x[m, c] (dA's,
    all RP rows); else for g_i's columns: P[BASE_i + c * RP + j] = Σ_m g_i[m, c] XA[m, j] (dB's). With FINISH,
    the block's last split to finish (`_last_to_arrive`) adds up all the splits' sums, scales them and writes
    the gradients, which `_finish` does otherwise in a launch of its own.

    The two branches are the same reduction on purpose: merged into one loop over a selected pointer and stride
    (either operand order), q, k and v took 46.8 or 47.4 us against 35.5 us for these two (bench/profile/
    lora_fold_parts.py on an H200: lora_fold_parts-h200-2026-11-30.json for this version,
    lora_fold_parts_merged_colpass_*-h200-2026-11-30.json for the merged ones). Why was not established; a
    likely cause is x's loads losing what the compiler knows of their pointer and stride (alignment) once they
    are selected at run time. Yet the dB branch's own run-time choice of g (one of three) stays: each g in its own
    branch with a loop of its own, as `_row_pass` has them, was slower at every shape, by 1.1 us (1,024 x 1,024)
    to 7.7 us (Llama-1.1B's q, k and v) (the `rows_cols` cases of lora_fold_parts_direct-h200-2026-11-30.json,
    less their `rows_only`)."""
    cb = tl.program_id(0)
    split = tl.program_id(1)
    start = split * rows_per
    end = tl.minimum(start + rows_per, M)
    jj = tl.arange(0, RP)
    part = P + split.to(tl.int64) * TOTAL
    if cb < NA:
        cols = cb * BC + tl.arange(0, BC)
        cmask = cols < K
        acc_a = tl.zeros([RP, BC], dtype=tl.float32)
        for m0 in range(start, end, BM):
            rows = m0 + tl.arange(0, BM)
            rmask = rows < end
            gb = tl.load(GB + rows[:, None].to(tl.int64) * RP + jj[None, :], mask=rmask[:, None], other=0.0)
            x = tl.load(X + rows[:, None].to(tl.int64) * K + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0)
            acc_a += _dot(tl.trans(gb), x, IEEE)
        offs_a = jj[:, None] * K + cols[None, :]
        tl.store(part + offs_a, acc_a, mask=cmask[None, :])
        if FINISH:
            if _last_to_arrive(CNT, cb, SPLITS):
                sum_a = _sum_splits(P, offs_a, cmask[None, :], SPLITS, TOTAL)
                scale = _rank_scale(jj, O1, O2, S0, S1, S2)
                tl.store(GA + offs_a, (sum_a * scale[:, None]).to(GA.dtype.element_ty),
                         mask=(jj < RSUM)[:, None] & cmask[None, :])
    else:
        c = cb - NA
        if c < NB0:
            g, N, base, out, R, off, s = G0, N0, BASE0, GB0, R0, 0, S0
        elif c < NB0 + NB1:
            g, N, base, out, R, off, s, c = G1, N1, BASE1, GB1, R1, O1, S1, c - NB0
        else:
            g, N, base, out, R, off, s, c = G2, N2, BASE2, GB2, R2, O2, S2, c - NB0 - NB1
        cols = c * BC + tl.arange(0, BC)
        cmask = cols < N
        acc_b = tl.zeros([BC, RP], dtype=tl.float32)
        for m0 in range(start, end, BM):
            rows = m0 + tl.arange(0, BM)
            rmask = rows < end
            gt = tl.load(g + rows[:, None].to(tl.int64) * N + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                         other=0.0)
            xa = tl.load(XA + rows[:, None].to(tl.int64) * RP + jj[None, :], mask=rmask[:, None], other=0.0)
            acc_b += _dot(tl.trans(gt), xa, IEEE)
        offs_b = base + cols[:, None] * RP + jj[None, :]
        tl.store(part + offs_b, acc_b, mask=cmask[:, None])
        if FINISH:
            if _last_to_arrive(CNT, cb, SPLITS):
                sum_b = _sum_splits(P, offs_b, cmask[:, None], SPLITS, TOTAL)
                j = jj - off
                tl.store(out + cols[:, None] * R + j[None, :], (sum_b * s).to(out.dtype.element_ty),
                         mask=cmask[:, None] & ((j >= 0) & (j < R))[None, :])


@triton.jit
def _finish(P, GA, GB0, GB1, GB2, SPLITS, TOTAL, K, RSUM, N0, N1, N2, R0, R1, R2, O1, O2, S0, S1, S2,
            BASE0, BASE1, BASE2, RP: tl.constexpr, BE: tl.constexpr):
    """Σ over splits of BE partial sums, scaled, into the gradient they belong to (regions start at multiples of
    BE, so a program never straddles two)."""
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    first = tl.program_id(0) * BE
    total = _sum_splits(P, e, e < TOTAL, SPLITS, TOTAL)
    if first < BASE0:  # dA's: (RP, K) partials into A_cat's (RSUM, K) gradient
        j = e // K
        ok = (j < RSUM) & (e < RP * K)
        scale = _rank_scale(j, O1, O2, S0, S1, S2)
        tl.store(GA + e, (total * scale).to(GA.dtype.element_ty), mask=ok)
    else:
        if first < BASE1:
            out, base, N, R, off, s = GB0, BASE0, N0, R0, 0, S0
        elif first < BASE2:
            out, base, N, R, off, s = GB1, BASE1, N1, R1, O1, S1
        else:
            out, base, N, R, off, s = GB2, BASE2, N2, R2, O2, S2
        local = e - base
        n = local // RP
        j = local % RP - off
        ok = (n < N) & (j >= 0) & (j < R)
        tl.store(out + n * R + j, (total * s).to(out.dtype.element_ty), mask=ok)


def supported(x2: torch.Tensor, grads: Sequence[torch.Tensor | None], As: Sequence[torch.Tensor]) -> bool:
    """Where these kernels apply: on a GPU (or the interpreter), up to MAX_LINEARS linears, every output reached
    the loss, at most MAX_RANKS ranks in all, some rows, a float dtype (tf32 is never used: fp32 runs in full
    precision)."""
    return ((x2.is_cuda or _INTERPRET) and len(As) <= MAX_LINEARS and sum(A.shape[0] for A in As) <= MAX_RANKS
            and x2.shape[0] > 0 and all(g is not None for g in grads)
            and x2.dtype in (torch.bfloat16, torch.float16, torch.float32))


#: (device, stream) -> the column pass's counters, all zero between calls (each call's last programs reset
#: theirs); calls on one stream never overlap, so one set per stream serves them all
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(dev: torch.device, blocks: int) -> torch.Tensor | None:
    """Zeroed int32 counters for `blocks` column blocks on this stream, or None inside a CUDA-graph capture that
    would have to allocate them (a capture must not; `_finish` then runs as its own launch)."""
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    have = _COUNTERS.get((dev, stream))
    if have is None or have.numel() < blocks:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        have = _COUNTERS[(dev, stream)] = torch.zeros(max(blocks, 1024), dtype=torch.int32, device=dev)
    return have


def slots(seq: Sequence, fill: object) -> list:
    """`seq` filled up to MAX_LINEARS entries with `fill`: these kernels and `lora_fold._fold_weights` take that
    many of each argument and read only the first len(seq)."""
    return list(seq) + [fill] * (MAX_LINEARS - len(seq))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def lowrank_grads(x2: torch.Tensor, grads: Sequence[torch.Tensor], As: Sequence[torch.Tensor],
                  Bts: Sequence[torch.Tensor], scalings: Sequence[float]
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dA_i, dB_i) for y_i = x (W_i + s_i B_i A_i)^T + b_i: x2 (M, K); g_i (M, N_i); A_i (r_i, K) and B_i^T
    (r_i, N_i) in x2's dtype; the gradients in x2's dtype, dB_i as B_i is, (N_i, r_i). The caller checks
    `supported`."""
    m, k = x2.shape
    n = len(As)
    ranks = [A.shape[0] for A in As]
    rsum = sum(ranks)
    rp = max(16, triton.next_power_of_2(rsum))
    dev, dtype = x2.device, x2.dtype
    ieee = dtype == torch.float32
    gs = [g.reshape(-1, g.shape[-1]).to(dtype).contiguous() for g in grads]
    ns = [g.shape[1] for g in gs]
    offs = [sum(ranks[:i]) for i in range(n)]
    a_cat = (As[0] if n == 1 else torch.cat(list(As), 0)).contiguous()
    Bts = [B.contiguous() for B in Bts]

    gp, bp, np_, rr, oo = slots(gs, gs[0]), slots(Bts, Bts[0]), slots(ns, 0), slots(ranks, 0), slots(offs, rsum)

    xa = torch.empty(m, rp, dtype=dtype, device=dev)
    gb = torch.empty(m, rp, dtype=dtype, device=dev)
    bm = ROW_BM_QKV if n == 3 else ROW_BM
    wide = (bm + rp) * WIDE_BK * x2.element_size() <= WIDE_STAGE_BYTES
    bkx, bkg = (WIDE_BK if wide and c >= ROW_WIDE else ROW_BK for c in (k, max(ns)))
    row_args = (x2, a_cat, *gp, *bp, xa, gb, m, k, *np_, rsum, *rr, oo[1], oo[2])
    meta = dict(RP=rp, BM=bm, IEEE=ieee)
    try:
        _row_pass[(triton.cdiv(m, bm), 1 + n)](*row_args, BKX=bkx, BKG=bkg, **meta)
    except triton.runtime.errors.OutOfResources:  # another Triton pipelines deeper: the narrow steps fit
        if (bkx, bkg) == (ROW_BK, ROW_BK):
            raise
        _row_pass[(triton.cdiv(m, bm), 1 + n)](*row_args, BKX=ROW_BK, BKG=ROW_BK, **meta)

    if PASSES == 1:
        return [], []
    na = triton.cdiv(k, COL_BC)
    nbs = [triton.cdiv(c, COL_BC) for c in ns]
    blocks = na + sum(nbs)
    split, rows_per = row_split(m, blocks, MIN_PROGRAMS, COL_BM)
    bases, at = [], _round_up(rp * k, FINISH_BLOCK)
    for c in ns:
        bases.append(at)
        at += _round_up(c * rp, FINISH_BLOCK)
    total = at
    bases = slots(bases, total)
    partial = torch.empty(split, total, dtype=torch.float32, device=dev)
    nbp = slots(nbs, 0)
    ga = torch.empty(rsum, k, dtype=dtype, device=dev)
    dbs = [torch.empty(c, r, dtype=dtype, device=dev) for c, r in zip(ns, ranks, strict=True)]
    sc = slots([float(s) for s in scalings], 0.0)
    dbp = slots(dbs, dbs[0])
    counters = _counters(dev, blocks) if FINISH_IN_COLS and PASSES == 3 else None
    _col_pass[(blocks, split)](x2, xa, gb, *gp, partial, m, k, *np_, rows_per, na, nbp[0], nbp[1], total, *bases,
                               partial if counters is None else counters, split, ga, *dbp, rsum, *rr,
                               oo[1], oo[2], *sc, RP=rp, BM=COL_BM, BC=COL_BC, IEEE=ieee,
                               FINISH=counters is not None)
    if PASSES == 2:
        return [], []
    if counters is None:
        _finish[(total // FINISH_BLOCK,)](partial, ga, *dbp, split, total, k, rsum, *np_, *rr,
                                          oo[1], oo[2], *sc, *bases, RP=rp, BE=FINISH_BLOCK)
    return list(ga.split(ranks, 0)), dbs
