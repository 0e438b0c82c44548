"""IA3 with its scales folded into the frozen weight: ((x ⊙ s_in) W^T + b) ⊙ s_out = x W'^T + b', where
W' = s_out ⊙ W ⊙ s_in (rows by s_out, columns by s_in) and b' = s_out ⊙ b.

Why: IA3 rescales activations, tokens x features, while the same scales applied to the weight touch only out x in
elements. At roberta-large size the ffn_out input is 4,096 x 4,096 per step against a 1,024 x 4,096 weight,
and `rowscale.ia3_linear` (the path "auto" took in CUDA graphs before) reads and writes that activation once
forward and reads two and writes one of its size backward, per scaled site. Folded:
- forward: one small kernel writes W' (and b'), then the frozen GEMM as the floor runs it;
- backward: the input gradient is the floor's own GEMM, g W' (it already holds s_out and s_in), and each scale's
  gradient is one read pass: colsum(g ⊙ y) / s_out, y being the output returned (for k and v attention keeps
  it anyway), and colsum(g_x ⊙ x) / s_in, x being the input (the reference keeps it too, for its multiply).
The division recovers the unscaled tensors' sums exactly up to rounding, whatever the scale's magnitude, except
at 0, where the scaled tensor has lost them: a scale with |s| < TINY is used as TINY, in the forward and the
backward alike. The forward then differs from the reference by at most TINY x |y|, far below bf16's rounding;
fp16 could not hold TINY x y, so fp16 stays on the other paths (`supported`).

Each gradient's column sum is one kernel over the whole column block (`_colsum`) when there are enough column
blocks to fill the GPU, else a fixed split of the rows into partial sums and a second kernel that adds them
(`_finish`): deterministic either way (no atomics), and at most two launches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from autopeft.kernels.partials import row_split

#: |s| below this is taken as TINY (see the module docstring); representable in bf16 and fp32
TINY = 1e-20
#: the column sums take column blocks of BLOCK_F and run at least MIN_PROGRAMS programs (MIN_PROGRAMS_WIDE from
#: WIDE features on), splitting the rows into partial sums where the column blocks are fewer. Measured on an
#: H200 (bench/profile/ia3_parts.py, ia3_parts-h200-2026-11-30.json, 4,096 rows of bf16): 4,096 features 21.3 us
#: (32 MiB per operand: 3 TB/s) against 24.3 us with 528 programs and 75 us with one per column block; 1,024
#: features 6.6 us against 8.4 us with 1,056 programs and 29 us with one per column block
BLOCK_F = 32
MIN_PROGRAMS, MIN_PROGRAMS_WIDE, WIDE = 528, 1056, 4096
BLOCK_T = 64
WEIGHT_BLOCK = 64


@triton.jit
def _safe(s):
    return tl.where(tl.abs(s) < 1e-20, 1e-20, s)  # TINY


@triton.jit
def _scale_weight(W, SO, SI, B, WO, BO, N, K, HAS_SO: tl.constexpr, HAS_SI: tl.constexpr, HAS_B: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    rmask, cmask = rows < N, cols < K
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SO:
        so = _safe(tl.load(SO + rows, mask=rmask, other=1.0).to(tl.float32))
        w = w * so[:, None]
    if HAS_SI:
        w = w * _safe(tl.load(SI + cols, mask=cmask, other=1.0).to(tl.float32))[None, :]
    tl.store(WO + offs, w.to(WO.dtype.element_ty), mask=mask)
    if HAS_B:  # only with HAS_SO: b' = s_out ⊙ b, written by the first column of programs
        if tl.program_id(1) == 0:
            b = tl.load(B + rows, mask=rmask, other=0.0).to(tl.float32) * so
            tl.store(BO + rows, b.to(BO.dtype.element_ty), mask=rmask)


@triton.jit
def _colsum(A, B, S, OUT, T, F, rows_per, FINAL: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    """Σ_t A[t, f] B[t, f] over this program's rows: divided by safe(S) into OUT when FINAL (one program per
    column block covers every row), else as fp32 partial sums, OUT[split, f]."""
    cols = tl.program_id(0) * BF + tl.arange(0, BF)
    cmask = cols < F
    start = tl.program_id(1) * rows_per
    acc = tl.zeros([BT, BF], dtype=tl.float32)
    for t0 in range(start, tl.minimum(start + rows_per, T), BT):
        rows = t0 + tl.arange(0, BT)
        offs = rows[:, None].to(tl.int64) * F + cols[None, :]
        mask = ((rows < T) & (rows < start + rows_per))[:, None] & cmask[None, :]
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        acc += a * tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0)
    if FINAL:
        s = _safe(tl.load(S + cols, mask=cmask, other=1.0).to(tl.float32))
        tl.store(OUT + cols, (total / s).to(OUT.dtype.element_ty), mask=cmask)
    else:
        tl.store(OUT + tl.program_id(1) * F + cols, total, mask=cmask)


@triton.jit
def _finish(P, S, OUT, SPLIT, F, BF: tl.constexpr):
    cols = tl.program_id(0) * BF + tl.arange(0, BF)
    cmask = cols < F
    total = tl.zeros([BF], dtype=tl.float32)
    for i in range(0, SPLIT):
        total += tl.load(P + i * F + cols, mask=cmask, other=0.0)
    s = _safe(tl.load(S + cols, mask=cmask, other=1.0).to(tl.float32))
    tl.store(OUT + cols, (total / s).to(OUT.dtype.element_ty), mask=cmask)


def colsum_div(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, block_f: int = BLOCK_F,
               min_programs: int | None = None) -> torch.Tensor:
    """Σ_t a[t] ⊙ b[t] / safe(s) for a, b [T, F] contiguous: the gradient of a scale folded into the weight, in
    s's dtype. `block_f` and `min_programs` are parameters so bench/profile/ia3_parts.py can time the choices."""
    rows, feats = a.shape
    min_programs = min_programs or (MIN_PROGRAMS_WIDE if feats >= WIDE else MIN_PROGRAMS)
    out = torch.empty(feats, dtype=s.dtype, device=a.device)
    col_blocks = triton.cdiv(feats, block_f)
    split, rows_per = row_split(rows, col_blocks, min_programs, BLOCK_T)
    if split == 1:
        _colsum[(col_blocks, 1)](a, b, s, out, rows, feats, rows, FINAL=True, BT=BLOCK_T, BF=block_f)
        return out
    partial = torch.empty(split, feats, dtype=torch.float32, device=a.device)
    _colsum[(col_blocks, split)](a, b, s, partial, rows, feats, rows_per, FINAL=False, BT=BLOCK_T, BF=block_f)
    _finish[(col_blocks,)](partial, s, out, split, feats, BF=block_f)
    return out


def fold_weight(w: torch.Tensor, b: torch.Tensor | None, scale_out: torch.Tensor | None,
                scale_in: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W' = safe(s_out) ⊙ W ⊙ safe(s_in) and b' = safe(s_out) ⊙ b, in `dtype`, in one launch."""
    n, k = w.shape
    w = w.contiguous()
    wo = torch.empty(n, k, dtype=dtype, device=w.device)
    has_b = b is not None and scale_out is not None
    bo = torch.empty(n, dtype=dtype, device=w.device) if has_b else None
    any_ = w  # a valid pointer for the arguments a specialisation never reads
    grid = (triton.cdiv(n, WEIGHT_BLOCK), triton.cdiv(k, WEIGHT_BLOCK))
    _scale_weight[grid](w, scale_out if scale_out is not None else any_, scale_in if scale_in is not None else any_,
                        b if has_b else any_, wo, bo if has_b else any_, n, k, HAS_SO=scale_out is not None,
                        HAS_SI=scale_in is not None, HAS_B=has_b, BN=WEIGHT_BLOCK, BK=WEIGHT_BLOCK)
    if b is not None and not has_b:
        bo = b.to(dtype)
    return wo, bo


class _FoldedIa3(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                scale_out: torch.Tensor | None, scale_in: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        wf, bf = fold_weight(w, b, scale_out, scale_in, x.dtype)
        y = F.linear(x2, wf, bf)
        need_so = scale_out is not None and ctx.needs_input_grad[3]
        need_si = scale_in is not None and ctx.needs_input_grad[4]
        ctx.save_for_backward(x2 if need_si else None, wf, y if need_so else None, scale_out, scale_in)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, wf, y, s_out, s_in = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        g = grad.reshape(-1, grad.shape[-1]).contiguous()
        gx = g @ wf if need_x or x2 is not None else None
        gso = colsum_div(g, y, s_out) if y is not None else None
        gsi = colsum_div(gx, x2.contiguous(), s_in) if x2 is not None else None
        return (gx.view(ctx.x_shape) if need_x else None), None, None, gso, gsi


def supported(dtype: torch.dtype, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Where the fold computes what the reference does: a frozen weight and bias (a trained W or b needs its own
    gradient, which the folded GEMM does not give), computing in bf16 or fp32 (see TINY)."""
    return dtype in (torch.bfloat16, torch.float32) and not w.requires_grad and (b is None or not b.requires_grad)


def ia3_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale_out: torch.Tensor | None = None,
               scale_in: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.ia3_linear` with the scales folded into the frozen weight. Where the fold does not apply
    (`supported`: a BitFit bias beside IA3, fp16), the path "auto" took in graphed steps before the fold:
    `rowscale.ia3_linear`, cuBLAS with the rescalings through `scale_rows`."""
    from autopeft.kernels import casts

    dtype = casts.compute_dtype(x)
    if (scale_out is None and scale_in is None) or not supported(dtype, w, b):
        from autopeft.kernels import rowscale

        return rowscale.ia3_linear(x, w, b, scale_out, scale_in)
    so = casts.cast(scale_out, dtype) if scale_out is not None else None
    si = casts.cast(scale_in, dtype) if scale_in is not None else None
    return _FoldedIa3.apply(x.to(dtype), w, b, so, si)
