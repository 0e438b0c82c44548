"""IA3 on the fused GEMM: the input scale in the prologue, the output scale in the epilogue.

Unfused, IA3 costs a full elementwise pass over the activations (and one more in the backward) on top of
the frozen GEMM it rides on; here each scale is applied to a tile already in registers. What the scale
gradients need (the unscaled output, the unscaled input gradient) is written by the same kernel only when
that scale is being trained.
"""

from __future__ import annotations

from typing import Any

import torch

from autopeft.kernels.gemm import AUX_AFTER_BIAS, AUX_BEFORE_SCALE, AUX_NONE, fused_gemm


class _Ia3Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                scale_out: torch.Tensor | None, scale_in: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        need_out = scale_out is not None and ctx.needs_input_grad[3]
        y, u = fused_gemm(x2, w.t(), bias=b, in_scale=scale_in, post_scale=scale_out,
                          aux_stage=AUX_AFTER_BIAS if need_out else AUX_NONE)
        ctx.save_for_backward(x2, w, scale_out, scale_in, u)
        ctx.x_shape = x.shape
        ctx.b_dtype = None if b is None else b.dtype
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x2, w, s_out, s_in, u = ctx.saved_tensors
        need_x, _, need_b, need_so, need_si = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gx = gb = gso = gsi = None
        if need_b and ctx.b_dtype is not None:
            gsum = g.sum(0, dtype=torch.float32)
            gb = (gsum * s_out.to(torch.float32) if s_out is not None else gsum).to(ctx.b_dtype)
        if need_so and s_out is not None:
            gso = (g * u).sum(0, dtype=torch.float32).to(s_out.dtype)
        if need_x or (need_si and s_in is not None):
            want_t = need_si and s_in is not None
            # g_x = ((g ⊙ s_out) W) ⊙ s_in: s_out as the prologue, s_in as the epilogue column scale
            gx, t = fused_gemm(g, w, in_scale=s_out, col_scale=s_in,
                               aux_stage=AUX_BEFORE_SCALE if want_t else AUX_NONE)
            if want_t:
                gsi = (x2 * t).sum(0, dtype=torch.float32).to(s_in.dtype)
            gx = gx.reshape(ctx.x_shape) if need_x else None
        return gx, None, gb, gso, gsi


def ia3_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale_out: torch.Tensor | None = None,
               scale_in: torch.Tensor | None = None) -> torch.Tensor:
    """((x ⊙ scale_in) W^T + b) ⊙ scale_out in one GEMM."""
    if w.requires_grad:
        from autopeft.kernels import reference

        return reference.ia3_linear(x, w, b, scale_out, scale_in)
    return _Ia3Linear.apply(x, w, b, scale_out, scale_in)
