"""One Triton GEMM with a configurable prologue and epilogue, shared by every fused adapter op.

Every adapter in this package is "a frozen GEMM plus something small": a low-rank product (LoRA, DoRA), a
per-feature rescale (IA3, DoRA's magnitude), a bias + activation or a residual add (bottleneck adapters).
Done one op at a time, each of those extras re-reads and re-writes the whole (M, N) activation in HBM; here
they are applied to the fp32 accumulator while the tile is still in registers, so the adapter costs about
one GEMM's memory traffic. The low-rank product is a second, short K-loop into the same accumulator, which
also means the base GEMM's output is never rounded to bf16 before the update is added.

Operands are passed with their strides, so `W^T` (forward) and `W` (input gradient) are the same kernel with
no transposed copy, and frozen weights in another dtype than the activations are cast tile by tile.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton 3.9's interpreter multiplies bf16 tiles as raw bits (fp16 and fp32 are right): under the interpreter,
# bf16 operands are widened to fp32 first, which is exact, so the result is what the GPU's bf16 dot gives.

ACT_CODES = {None: 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4}

#: aux output stages: the accumulator is also stored before the column scale (DoRA's z, IA3's input-gradient
#: before its scale) or after the bias (bottleneck pre-activation, IA3's output before its scale)
AUX_NONE, AUX_BEFORE_SCALE, AUX_AFTER_BIAS = 0, 1, 2


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:
        x = x * tl.sigmoid(x)
    elif ACT == 4:
        x = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return x


@triton.jit
def _fused_gemm_kernel(
    X, W, LR, LB, BIAS, CS, PS, IS, RES, OUT, AUX,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_lm, stride_lr, stride_br, stride_bn,
    stride_rm, stride_rn, stride_om, stride_on, stride_am, stride_an,
    alpha,
    HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CS: tl.constexpr, HAS_PS: tl.constexpr,
    HAS_IS: tl.constexpr, HAS_RES: tl.constexpr, AUX_STAGE: tl.constexpr, ACT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped tile order: neighbouring programs share rows of X and columns of W in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrapped row/column indices: loads never go out of bounds without a mask, stores are masked below
    rm_l = rm % M
    rn_l = rn % N
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_ptrs = X + rm_l[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = W + rk[:, None] * stride_wk + rn_l[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        a = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        if HAS_IS:
            s_in = tl.load(IS + k0 + rk, mask=k_mask, other=0.0).to(a.dtype)
            a = (a.to(tl.float32) * s_in.to(tl.float32)[None, :]).to(a.dtype)
        b = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_LR:
        rr = tl.arange(0, BLOCK_R)
        lr_ptrs = LR + rm_l[:, None] * stride_lm + rr[None, :] * stride_lr
        lb_ptrs = LB + rr[:, None] * stride_br + rn_l[None, :] * stride_bn
        for r0 in range(0, R, BLOCK_R):
            r_mask = (r0 + rr) < R
            la = tl.load(lr_ptrs, mask=r_mask[None, :], other=0.0)
            lb = tl.load(lb_ptrs, mask=r_mask[:, None], other=0.0)
            if UPCAST:
                la = la.to(tl.float32)
                lb = lb.to(tl.float32)
            else:
                lb = lb.to(la.dtype)
            acc = tl.dot(la, lb, acc, input_precision=PRECISION)
            lr_ptrs += BLOCK_R * stride_lr
            lb_ptrs += BLOCK_R * stride_br

    n_mask = rn < N
    out_mask = (rm < M)[:, None] & n_mask[None, :]
    if AUX_STAGE == 1:
        tl.store(AUX + rm[:, None] * stride_am + rn[None, :] * stride_an, acc.to(AUX.dtype.element_ty),
                 mask=out_mask)
    if HAS_CS:
        acc = acc * tl.load(CS + rn_l).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn_l).to(tl.float32)[None, :]
    if AUX_STAGE == 2:
        tl.store(AUX + rm[:, None] * stride_am + rn[None, :] * stride_an, acc.to(AUX.dtype.element_ty),
                 mask=out_mask)
    if HAS_PS:
        acc = acc * tl.load(PS + rn_l).to(tl.float32)[None, :]
    acc = _activation(acc, ACT)
    if HAS_RES:
        res = tl.load(RES + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=out_mask, other=0.0)
        acc = res.to(tl.float32) + alpha * acc
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(OUT.dtype.element_ty), mask=out_mask)


def _configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter is slow and has nothing to tune: one small tile
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in shapes]


_tuned_kernel = triton.autotune(
    configs=_configs(),
    key=["M", "N", "K", "R", "HAS_LR", "HAS_IS", "ACT", "HAS_RES", "AUX_STAGE"],
)(_fused_gemm_kernel)


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own TF32 switch, so "kernels on" is exactly as precise as "off"."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_r(r: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max(r, 1))))


def fused_gemm(x: torch.Tensor, w: torch.Tensor, *, lr: torch.Tensor | None = None, lb: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, col_scale: torch.Tensor | None = None,
               post_scale: torch.Tensor | None = None, in_scale: torch.Tensor | None = None,
               activation: str | None = None, residual: torch.Tensor | None = None, alpha: float = 1.0,
               aux_stage: int = AUX_NONE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out = res + alpha * act(((in_scale ⊙ x) @ w + lr @ lb) ⊙ col_scale + bias) ⊙ post_scale), all optional.

    x (M, K) and lr (M, R) give the output dtype; w (K, N) and lb (R, N) may be any strided view (pass
    `W.t()` for a linear layer's forward) and any float dtype. Returns (out, aux) where aux is the
    accumulator stored at `aux_stage` (None when AUX_NONE): what a backward pass needs and would otherwise
    recompute with a second GEMM.
    """
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[0], (x.shape, w.shape)
    M, K = x.shape
    N = w.shape[1]
    # the interpreter also truncates fp32 -> bf16 stores (the GPU rounds to nearest): store fp32 there, round here
    store_dtype = torch.float32 if INTERPRET and x.dtype == torch.bfloat16 else x.dtype
    out = torch.empty((M, N), device=x.device, dtype=store_dtype)
    aux = torch.empty((M, N), device=x.device, dtype=store_dtype) if aux_stage else None
    if M == 0 or N == 0:
        return out.to(x.dtype), None if aux is None else aux.to(x.dtype)
    upcast = INTERPRET and x.dtype == torch.bfloat16
    if upcast:  # round other-dtype operands as the GPU's in-kernel cast would (rtne), since the interpreter can't
        w = w.to(x.dtype)
        lb = None if lb is None else lb.to(x.dtype)
    R = 0
    if lr is not None:
        assert lb is not None and lr.shape[0] == M and lr.shape[1] == lb.shape[0] and lb.shape[1] == N
        assert lr.dtype == x.dtype, "the low-rank operand must be in the activation dtype"
        R = lr.shape[1]
    has_lr = lr is not None and R > 0
    dummy = out  # never dereferenced when its flag is off
    lr_, lb_ = (lr, lb) if has_lr else (dummy, dummy)
    res_ = residual if residual is not None else dummy
    aux_ = aux if aux is not None else dummy
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _tuned_kernel[grid](
        x, w, lr_, lb_,
        bias if bias is not None else dummy, col_scale if col_scale is not None else dummy,
        post_scale if post_scale is not None else dummy, in_scale if in_scale is not None else dummy,
        res_, out, aux_,
        M, N, K, R,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        lr_.stride(0), lr_.stride(1), lb_.stride(0), lb_.stride(1),
        res_.stride(0), res_.stride(1), out.stride(0), out.stride(1), aux_.stride(0), aux_.stride(1),
        float(alpha),
        HAS_LR=has_lr, HAS_BIAS=bias is not None, HAS_CS=col_scale is not None, HAS_PS=post_scale is not None,
        HAS_IS=in_scale is not None, HAS_RES=residual is not None, AUX_STAGE=aux_stage,
        ACT=ACT_CODES[activation], PRECISION=_precision(x.dtype), BLOCK_R=_block_r(R),
        UPCAST=upcast,
    )
    if store_dtype != x.dtype:
        return out.to(x.dtype), None if aux is None else aux.to(x.dtype)
    return out, aux


@triton.jit
def _row_norm_kernel(W, B, A, OUT, N, K, R, scaling,
                     stride_wn, stride_wk, stride_bn, stride_br, stride_ar, stride_ak,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        w = tl.load(W + rn[:, None] * stride_wn + (k0 + rk)[None, :] * stride_wk,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r_mask = (r0 + rr) < R
            b = tl.load(B + rn[:, None] * stride_bn + (r0 + rr)[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            a = tl.load(A + (r0 + rr)[:, None] * stride_ar + (k0 + rk)[None, :] * stride_ak,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            ba = tl.dot(b, a, ba, input_precision="ieee")
        v = w + scaling * ba
        sq += tl.sum(v * v, axis=1)
    tl.store(OUT + rn, tl.sqrt(sq), mask=n_mask)


def lowrank_row_norm(w: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| per row in fp32, without materialising the (out, in) fp32 matrix DoRA would otherwise
    build every step (its memory traffic is several times the weight's)."""
    N, K = w.shape
    R = A.shape[0]
    out = torch.empty(N, device=w.device, dtype=torch.float32)
    block_n, block_k = (32, 32) if INTERPRET else (64, 64)
    _row_norm_kernel[(triton.cdiv(N, block_n),)](
        w, B, A, out, N, K, R, float(scaling),
        w.stride(0), w.stride(1), B.stride(0), B.stride(1), A.stride(0), A.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block_r(R),
    )
    return out
