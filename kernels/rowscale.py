"""Per-feature scale (and shift) of an activation, per chunk of rows: y * s[slot] + c[slot], forward and backward.

Why a kernel for an elementwise op: the scale vector broadcasts over the rows, and PyTorch runs a broadcasting
elementwise op on its non-vectorised path. On an H200 that multiply ran at about a third of the memory bandwidth
its contiguous twin gets (bench/results/packing_step-h200-2026-11-30.json: 26.6 ms of a 224 ms packed step,
roberta-large size), and autograd's backward adds three more passes over the activation (g * s, g * y, the
reductions). IA3 (every output- or input-scaled linear), DoRA's magnitude and a pack's per-trial rescalings are
all this op. Here the forward is one pass, and the backward one pass that writes the input gradient and, in the
same loop, the per-block partial sums of the scale's and shift's gradients (reduced over blocks afterwards, a
[blocks, features] fp32 tensor, a few MB).

Layout: `y` is [G, T, F] (G chunks of T rows; one chunk for a plain linear), `scale` and `shift` are [K, F], and
chunk g uses row `idx[g]` of them (row g without `idx`). Compute is fp32; the output has y's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_T = 32
BLOCK_F = 128


@triton.jit
def _tile(IDX, T, F, n_t_blocks, HAS_IDX: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    """This program's tile: BT rows of one chunk x BF features. Returns the chunk's slot, the features, their
    mask, the tile's element offsets and its mask."""
    pid = tl.program_id(0)
    g = pid // n_t_blocks
    rows = (pid % n_t_blocks) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    slot = tl.load(IDX + g) if HAS_IDX else g
    cmask = cols < F
    offs = (g * T + rows)[:, None].to(tl.int64) * F + cols[None, :]
    return slot, cols, cmask, offs, (rows < T)[:, None] & cmask[None, :]


@triton.jit
def _forward(Y, S, C, IDX, OUT, T, F, n_t_blocks,
             HAS_SHIFT: tl.constexpr, HAS_IDX: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    slot, cols, cmask, offs, mask = _tile(IDX, T, F, n_t_blocks, HAS_IDX, BT, BF)
    s = tl.load(S + slot * F + cols, mask=cmask, other=0.0).to(tl.float32)
    out = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32) * s[None, :]
    if HAS_SHIFT:
        out += tl.load(C + slot * F + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _backward(G, Y, S, IDX, GY, PS, PC, T, F, n_t_blocks,
              NEED_Y: tl.constexpr, NEED_S: tl.constexpr, NEED_C: tl.constexpr, HAS_IDX: tl.constexpr,
              BT: tl.constexpr, BF: tl.constexpr):
    pid = tl.program_id(0)
    slot, cols, cmask, offs, mask = _tile(IDX, T, F, n_t_blocks, HAS_IDX, BT, BF)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if NEED_Y:
        s = tl.load(S + slot * F + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(GY + offs, (g * s[None, :]).to(GY.dtype.element_ty), mask=mask)
    if NEED_S:
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(PS + pid * F + cols, tl.sum(g * y, axis=0), mask=cmask)
    if NEED_C:
        tl.store(PC + pid * F + cols, tl.sum(g, axis=0), mask=cmask)


def _per_slot(partials: torch.Tensor, chunks: int, idx: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Block partial sums [chunks * blocks, F] -> the gradient of a [K, F] vector, in its dtype."""
    per_chunk = partials.view(chunks, -1, partials.shape[-1]).sum(1)
    if idx is None:
        return per_chunk.to(like.dtype)
    return torch.zeros(like.shape, dtype=torch.float32, device=like.device).index_add_(0, idx, per_chunk).to(
        like.dtype)


class _ScaleRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None,
                idx: torch.Tensor | None) -> torch.Tensor:
        y = y.contiguous()
        chunks, rows, feats = y.shape
        out = torch.empty_like(y)
        n_t = triton.cdiv(rows, BLOCK_T)
        grid = (chunks * n_t, triton.cdiv(feats, BLOCK_F))
        _forward[grid](y, scale.contiguous(), shift.contiguous() if shift is not None else scale, idx
                       if idx is not None else scale, out, rows, feats, n_t, HAS_SHIFT=shift is not None,
                       HAS_IDX=idx is not None, BT=BLOCK_T, BF=BLOCK_F)
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, scale, shift, idx)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, scale, shift, idx = ctx.saved_tensors
        need_y, need_s, need_c = ctx.needs_input_grad[:3]
        need_c = need_c and shift is not None
        grad = grad.contiguous()
        chunks, rows, feats = grad.shape
        n_t = triton.cdiv(rows, BLOCK_T)
        grid = (chunks * n_t, triton.cdiv(feats, BLOCK_F))
        gy = torch.empty_like(grad) if need_y else None
        ps = torch.empty(chunks * n_t, feats, dtype=torch.float32, device=grad.device) if need_s else None
        pc = torch.empty(chunks * n_t, feats, dtype=torch.float32, device=grad.device) if need_c else None
        any_ = grad  # a valid pointer for the arguments a specialisation never reads
        _backward[grid](grad, y if y is not None else any_, scale, idx if idx is not None else any_,
                        gy if gy is not None else any_, ps if ps is not None else any_, pc if pc is not None
                        else any_, rows, feats, n_t, NEED_Y=need_y, NEED_S=need_s, NEED_C=need_c,
                        HAS_IDX=idx is not None, BT=BLOCK_T, BF=BLOCK_F)
        gs = _per_slot(ps, chunks, idx, scale) if need_s else None
        gc = _per_slot(pc, chunks, idx, shift) if need_c else None
        return gy, gs, gc, None


def scale_rows(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None,
               idx: torch.Tensor | None = None) -> torch.Tensor:
    """y [G, T, F] * scale[slot] + shift[slot], slot = idx[g] (or g), as `reference.scale_rows`. Vectors of
    another dtype than y (an fp32 shift promotes the reference's result) go to the reference."""
    if scale.dtype != y.dtype or (shift is not None and shift.dtype != y.dtype) or y.dim() != 3:
        from autopeft.kernels import reference

        return reference.scale_rows(y, scale, shift, idx)
    return _ScaleRows.apply(y, scale, shift, idx)


def ia3_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale_out: torch.Tensor | None = None,
               scale_in: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.ia3_linear` with cuBLAS for the GEMM and `scale_rows` for each rescaling, instead of a
    broadcasting multiply (non-vectorised in PyTorch) and autograd's three-pass backward of it."""
    from autopeft.kernels import casts
    from autopeft.kernels.reference import _cast

    if scale_in is not None:
        x = scale_rows(x.reshape(1, -1, x.shape[-1]), casts.cast(scale_in, x.dtype).view(1, -1)).view(x.shape)
    y = F.linear(x, _cast(w, x), _cast(b, x))
    if scale_out is None:
        return y
    return scale_rows(y.reshape(1, -1, y.shape[-1]), casts.cast(scale_out, y.dtype).view(1, -1)).view(y.shape)


def scale_chunk(out: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """out = y * scale + shift for one chunk of rows (y, out [T, F], contiguous, out may be y; vectors [F]), one
    pass: for callers that rescale some chunks of a pack and not the others (`grouped_fold`)."""
    rows, feats = y.shape
    n_t = triton.cdiv(rows, BLOCK_T)
    _forward[(n_t, triton.cdiv(feats, BLOCK_F))](y, scale, shift if shift is not None else scale, scale, out, rows,
                                                 feats, n_t, HAS_SHIFT=shift is not None, HAS_IDX=False,
                                                 BT=BLOCK_T, BF=BLOCK_F)


def chunk_sums(g: torch.Tensor, y: torch.Tensor | None, plain: bool = True
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(sum over rows of g * y where y is given, sum over rows of g where `plain`), fp32 [F], for one chunk g, y
    [T, F]: the gradients of a row scale and shift, in one pass with fp32 products (a PyTorch product and sum would
    be a cast, a multiply and a reduction, each a pass)."""
    rows, feats = g.shape
    n_t = triton.cdiv(rows, BLOCK_T)

    def partials(wanted: bool) -> torch.Tensor | None:
        return torch.empty(n_t, feats, dtype=torch.float32, device=g.device) if wanted else None

    ps, pc = partials(y is not None), partials(plain)
    _backward[(n_t, triton.cdiv(feats, BLOCK_F))](g, g if y is None else y, g, g, g, g if ps is None else ps,
                                                  g if pc is None else pc, rows, feats, n_t, NEED_Y=False,
                                                  NEED_S=y is not None, NEED_C=plain, HAS_IDX=False, BT=BLOCK_T,
                                                  BF=BLOCK_F)
    return (None if ps is None else ps.sum(0)), (None if pc is None else pc.sum(0))
