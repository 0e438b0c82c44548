"""A pack's linear site with every trial's LoRA folded into a weight of its own: for chunk k of rows (trial k),
    y_k = ((x_k * si_k) (W + s B_k A_k)^T + [before_k] b_k) * so_k + c_k,
the frozen GEMM's work done once per trial with W'_k = diag(so_k) (W + s B_k A_k) diag(si_k) and nothing else
over the activations, the way `lora_fold` does it for one trial.

Why: `autopeft.packing.PackedLinear._grouped` runs the frozen GEMM over the whole pack and adds each trial's
terms on top: x A^T, an accumulating batched GEMM into y, and (IA3, DoRA) a rescaling over every row of the pack,
trials without one included. Backward, the low-rank path's input gradient is a full-size tensor summed into the
frozen one. At roberta-large size (8 trials x 4,096 rows, H200, in a CUDA graph) a 1,024-wide site took 481 us
that way against 252 for the frozen linear alone (bench/results/grouped_fold_parts-h200-2026-11-30.json), and a
pack's step ran 171.8 ms, 17 ms of them in rescalings of rows that do not change. Here:
- forward: the K folds in one launch (`lora_fold.fold_stack` on a GPU: `baddbmm` from the broadcast W copied W
  into each output first), then one cuBLAS GEMM per trial, the bias in its epilogue (a batched
  GEMM has no bias epilogue, and adding it after cost 95 to 325 us a site, more than the per-trial GEMMs lose
  against one large one: 22 to 59 us), into the pack's output rows; the rescaling only on the rows of the trials
  that have one (`out_slots`), whose pre-scale output is kept for the scale's gradient;
- backward: the input gradient as one batched GEMM with the folded, out-scaled weights (exact, since the
  rescaling is linear), IA3-on-the-input's rows rescaled after it; A's and B's gradients as four skinny batched
  GEMMs, the rescalings moved onto A and B (x A'^T with A' = A diag(si), g B' with B' = diag(so) B) so that no
  rescaled copy of an activation is made; only over the chunks of trials with LoRA at the site (`lora_slots`).
The pack's step went from 171.8 to 124.2 ms (bench/results/packing_step_graph_profile-, packing-h200-2026-11-30.json).
Memory: the K folded weights are kept for backward (at roberta-large size and K = 8, 192 MiB a layer).
Numerics: as `lora_fold`, W'_k is rounded to the compute dtype; the gradients are the exact formulas.

`reference.grouped_lora_linear` is the same computation term by term with autograd, for the tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch


class _GroupedFold(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x3: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                Bt: torch.Tensor, scale_out: torch.Tensor | None, shift: torch.Tensor | None,
                scale_in: torch.Tensor | None, alpha: float, before: tuple[bool, ...] | None,
                out_slots: tuple[int, ...], in_slots: tuple[int, ...], lora_slots: tuple[int, ...]
                ) -> torch.Tensor:
        chunks, rows = x3.shape[:2]
        gpu = _triton(x3)
        if gpu:
            from autopeft.kernels import lora_fold

            folded = lora_fold.fold_stack(w, A, Bt.transpose(1, 2), alpha, x3.dtype)
        else:
            folded = torch.baddbmm(w.expand(chunks, -1, -1), Bt.transpose(1, 2), A, alpha=alpha)
        y = x3.new_empty(chunks, rows, w.shape[0])
        kept = []
        for k in range(chunks):
            wk = folded[k] * scale_in[k] if k in in_slots else folded[k]
            bk = None if bias is None or (before is not None and not before[k]) else (
                bias if bias.dim() == 1 else bias[k])
            out = y[k] if k not in out_slots else torch.empty_like(y[k])
            if bk is None:
                torch.mm(x3[k], wk.t(), out=out)
            else:
                torch.addmm(bk, x3[k], wk.t(), out=out)
            if k in out_slots:
                kept.append(out)
                _rescale(y[k], out, scale_out[k], None if shift is None else shift[k], gpu)
        for k in out_slots:  # backward's weights: the input gradient of the rescaled output is g diag(so) W'
            folded[k].mul_(scale_out[k].unsqueeze(1))
        ctx.save_for_backward(x3, folded, A, Bt, scale_out, scale_in, *kept)
        ctx.alpha, ctx.before, ctx.out_slots, ctx.in_slots = alpha, before, out_slots, in_slots
        ctx.lora_slots = lora_slots
        ctx.shared_bias = bias is not None and bias.dim() == 1
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x3, folded, A, Bt, so, si, *kept = ctx.saved_tensors
        need_x, _, need_bias, need_A, need_B, need_so, need_shift, need_si = ctx.needs_input_grad[:8]
        out_slots, in_slots, alpha = ctx.out_slots, ctx.in_slots, ctx.alpha
        g = g.contiguous()
        f32 = torch.promote_types(x3.dtype, torch.float32)  # sums in fp32 at least
        gpu = _triton(x3)
        so, si = _only(so, out_slots), _only(si, in_slots)  # identity for the others, whatever they held
        gx = gbias = gso = gshift = gsi = None
        if need_x or need_si:
            gx = torch.bmm(g, folded)
            if need_si:
                gsi = torch.zeros(si.shape, dtype=f32, device=si.device)
            for k in in_slots:
                if need_si:
                    gsi[k] = _sums(gx[k], x3[k], False, gpu)[0]
                _rescale(gx[k], gx[k], si[k], None, gpu)
        if need_so or need_shift:
            gso = torch.zeros(so.shape, dtype=f32, device=so.device) if need_so else None
            gshift = torch.zeros(so.shape, dtype=f32, device=so.device) if need_shift else None
            for k, z in zip(out_slots, kept, strict=True):
                sums = _sums(g[k], z if need_so else None, need_shift, gpu)
                if need_so:
                    gso[k] = sums[0]
                if need_shift:
                    gshift[k] = sums[1]
        if need_bias:
            per_slot = g.sum(1, dtype=f32)
            if out_slots:
                per_slot = per_slot * so.to(f32)
            for k in range(per_slot.shape[0] if ctx.before is not None else 0):
                if not ctx.before[k]:
                    per_slot[k] = 0
            gbias = per_slot.sum(0) if ctx.shared_bias else per_slot
        gA = gBt = None
        runs = _runs(ctx.lora_slots)
        if need_A:  # (g B')^T x, B' = diag(so) B; then the columns times si
            gA = _skinny(g, Bt * so.unsqueeze(1) if out_slots else Bt, x3, runs, alpha, si if in_slots else None)
        if need_B:  # (x A'^T)^T g, A' = A diag(si); then the columns times so
            gBt = _skinny(x3, A * si.unsqueeze(1) if in_slots else A, g, runs, alpha, so if out_slots else None)
        # every input came in x3's dtype (`grouped_lora_linear` casts them)
        gbias, gso, gshift, gsi = (None if t is None else t.to(x3.dtype) for t in (gbias, gso, gshift, gsi))
        return (gx if need_x else None, None, gbias, gA, gBt, gso, gshift, gsi, None, None, None, None, None)


def _skinny(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, runs: list[tuple[int, int]], alpha: float,
            scale: torch.Tensor | None) -> torch.Tensor:
    """alpha (a_k w_k^T)^T b_k [K, r, width of b], its columns times scale_k, over the chunks in `runs` only
    (zeros for the others: trials without LoRA here, whose A and B are zeros)."""
    out = w.new_zeros(w.shape[0], w.shape[1], b.shape[2])
    for s, e in runs:
        torch.bmm(torch.bmm(a[s:e], w[s:e].transpose(1, 2)).transpose(1, 2), b[s:e], out=out[s:e])
    out.mul_(alpha)
    return out if scale is None else out.mul_(scale.unsqueeze(1))


def _runs(slots: tuple[int, ...]) -> list[tuple[int, int]]:
    """Consecutive slots as [start, stop) ranges: one batched GEMM per range, on views of the pack's chunks."""
    runs: list[tuple[int, int]] = []
    for k in slots:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


def _triton(x: torch.Tensor) -> bool:
    """The Triton fold and chunk rescalings on CUDA (or under the interpreter, how the tests reach them on a
    CPU); PyTorch's ops elsewhere."""
    from autopeft import kernels

    return (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and kernels.triton_available()


def _only(scale: torch.Tensor | None, slots: tuple[int, ...]) -> torch.Tensor | None:
    if scale is None or not slots:
        return scale
    out = torch.ones_like(scale)
    for k in slots:  # row copies, no index tensor: a host-to-device copy cannot be captured in a CUDA graph
        out[k] = scale[k]
    return out


def _rescale(out: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, gpu: bool) -> None:
    """out = y * scale (+ shift) for one chunk [T, F]: `rowscale.scale_chunk` on a GPU, PyTorch's ops elsewhere."""
    if gpu:
        from autopeft.kernels import rowscale

        rowscale.scale_chunk(out, y, scale, shift)
    elif shift is None:
        torch.mul(y, scale, out=out)
    else:
        torch.addcmul(shift, y, scale, out=out)


def _sums(g: torch.Tensor, y: torch.Tensor | None, plain: bool, gpu: bool
          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(sum over rows of g * y where y is given, sum over rows of g where `plain`) for one chunk, in fp32 at least:
    a scale's and a shift's gradients. `rowscale.chunk_sums` on a GPU, PyTorch's ops elsewhere."""
    if gpu:
        from autopeft.kernels import rowscale

        return rowscale.chunk_sums(g, y, plain)
    f32 = torch.promote_types(g.dtype, torch.float32)
    return ((g.to(f32) * y.to(f32)).sum(0) if y is not None else None), (g.sum(0, dtype=f32) if plain else None)


def grouped_lora_linear(x3: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                        Bt: torch.Tensor, alpha: float, scale_out: torch.Tensor | None = None,
                        shift: torch.Tensor | None = None, scale_in: torch.Tensor | None = None, *,
                        before: Sequence[bool] | None = None, out_slots: Sequence[int] = (),
                        in_slots: Sequence[int] = (), lora_slots: Sequence[int] | None = None) -> torch.Tensor:
    """y [K, T, out] for x3 [K, T, in] (chunk k is trial k's rows), all in x3's dtype: the frozen `w` [out, in],
    `bias` shared [out] or per trial [K, out] (added before the rescaling where `before[k]`, default every
    trial), A [K, r, in] and Bt [K, r, out] (B transposed; `alpha` scales B A), `scale_out`/`shift` [K, out]
    read for the trials in `out_slots` only, `scale_in` [K, in] for those in `in_slots` only; the others' rows
    are neither rescaled nor shifted, whatever those rows hold. `lora_slots` (default: every trial) are the trials
    with LoRA here; the others' A and B must be zeros (a pack's padding), whose gradients are zeros, given
    without the four skinny GEMMs over their rows (at a site where 2 trials of 8 have LoRA, 3/4 of that work).
    `w` must be frozen (its gradient is not made)."""
    if w.requires_grad:
        raise ValueError("grouped_lora_linear folds into a frozen weight; this one requires grad")
    if scale_out is None and out_slots:
        raise ValueError("out_slots given without scale_out")
    if scale_in is None and in_slots:
        raise ValueError("in_slots given without scale_in")
    # every operand in x3's dtype (differentiable casts, no-ops for a pack's, which come cast), and x3 contiguous:
    # the Triton helpers address rows as row * width
    bias, A, Bt, scale_out, shift, scale_in = (None if t is None else t.to(x3.dtype)
                                               for t in (bias, A, Bt, scale_out, shift, scale_in))
    x3 = x3.contiguous()
    with torch.autocast(x3.device.type, enabled=False):
        return _GroupedFold.apply(x3, w.to(x3.dtype), bias, A, Bt, scale_out, shift, scale_in, float(alpha),
                                  None if before is None else tuple(bool(b) for b in before),
                                  tuple(out_slots), tuple(in_slots),
                                  tuple(range(x3.shape[0]) if lora_slots is None else sorted(lora_slots)))
