"""Bottleneck adapters (serial and parallel) on the fused GEMM, forward and backward.

Forward is two kernel launches: the down-projection with its bias and activation in the epilogue (the
pre-activation is stored too, rank-sized, for the backward), and the up-projection with its bias, the
adapter scale and the residual add in the epilogue, so the (M, hidden) output is written exactly once and
no `scale * up(...)` temporary exists. The backward's hidden-sized work is one fused GEMM as well (the
input gradient with the residual's gradient added in its epilogue); the rest is bottleneck-sized.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from autopeft.kernels.gemm import ACT_CODES, AUX_AFTER_BIAS, fused_gemm


def _activation_grad(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / d pre, in fp32."""
    p = pre.to(torch.float32)
    if activation == "relu":
        return (p > 0).to(torch.float32)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(p * (1.0 / math.sqrt(2.0))))
        return cdf + p * torch.exp(-0.5 * p * p) * (1.0 / math.sqrt(2.0 * math.pi))
    if activation == "silu":
        sig = torch.sigmoid(p)
        return sig * (1.0 + p * (1.0 - sig))
    if activation == "tanh":
        return 1.0 - torch.tanh(p) ** 2
    raise ValueError(f"unknown activation {activation!r}")


class _Bottleneck(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor | None, up_w: torch.Tensor,
                up_b: torch.Tensor | None, activation: str, residual: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        res2 = x2 if residual is None else residual.reshape(-1, residual.shape[-1]).to(x.dtype)
        h, pre = fused_gemm(x2, down_w.t(), bias=down_b, activation=activation, aux_stage=AUX_AFTER_BIAS)
        out, _ = fused_gemm(h, up_w.t(), bias=up_b, residual=res2, alpha=scale)
        ctx.save_for_backward(x2, down_w, up_w, h, pre)
        ctx.activation, ctx.scale, ctx.x_shape = activation, scale, x.shape
        ctx.has_residual = residual is not None
        ctx.res_dtype = None if residual is None else residual.dtype
        ctx.db_dtype = None if down_b is None else down_b.dtype
        ctx.ub_dtype = None if up_b is None else up_b.dtype
        return out.reshape(*x.shape[:-1], up_w.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x2, down_w, up_w, h, pre = ctx.saved_tensors
        need_x, need_dw, need_db, need_uw, need_ub, _, need_res = ctx.needs_input_grad[:7]
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gx = gdw = gdb = guw = gub = gres = None
        if need_ub and ctx.ub_dtype is not None:
            gub = (s * g.sum(0, dtype=torch.float32)).to(ctx.ub_dtype)
        if need_uw:
            guw = (s * (g.t() @ h)).to(up_w.dtype)
        if ctx.has_residual and need_res:
            gres = g.reshape(grad.shape).to(ctx.res_dtype)
        if need_x or need_dw or need_db:
            gh = (g @ up_w.to(g.dtype)).to(torch.float32) * s
            gpre = (gh * _activation_grad(pre, ctx.activation)).to(g.dtype)  # (M, bottleneck)
            if need_db and ctx.db_dtype is not None:
                gdb = gpre.sum(0, dtype=torch.float32).to(ctx.db_dtype)
            if need_dw:
                gdw = (gpre.t() @ x2).to(down_w.dtype)
            if need_x:
                # a serial adapter's own input is its residual: that gradient is added in the epilogue
                gx, _ = fused_gemm(gpre, down_w, residual=None if ctx.has_residual else g)
                gx = gx.reshape(ctx.x_shape)
        return gx, gdw, gdb, guw, gub, None, gres, None


def bottleneck_adapter(x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor,
                       up_b: torch.Tensor, activation: str = "relu", residual: torch.Tensor | None = None,
                       scale: float = 1.0) -> torch.Tensor:
    """(residual or x) + scale * up(act(down(x))) in two fused GEMMs."""
    if activation not in ACT_CODES or activation is None:
        raise ValueError(f"unknown activation {activation!r}; expected relu, gelu, silu or tanh")
    return _Bottleneck.apply(x, down_w, down_b, up_w, up_b, activation, residual, float(scale))
