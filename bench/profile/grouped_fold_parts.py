"""What a pack's grouped LoRA site costs beyond the frozen linear, per way of computing it, inside a CUDA graph,
at the pack bench/packing_step.py times (8 trials x 4,096 rows, roberta-large-size linears, bf16).

Why: graphed, that pack's step ran 171 ms, 191.6k tokens/s against a 250k target
(bench/results/packing_step_bf16_norms-h200-2026-11-30.json), where the frozen work alone is about 113 ms. The
grouped path adds each trial's LoRA term to the shared GEMM's output (x A^T, then an accumulating batched GEMM):
forward, one more read of x and a read and a write of y; backward, the input gradient of the low-rank path as a
full-size tensor added to the frozen one. Folding each trial's update into its own weight W'_k = W + s B_k A_k,
as the single-trial kernels do (`kernels.lora_fold`), makes forward and input gradient one batched GEMM, but
loses the frozen bias from cuBLAS's epilogue. The cases (`<in>x<out>_` prefix):
- `floor_fwd`, `floor_dgrad`: the frozen linear over the pack's rows (bias in the epilogue), its input gradient;
- `bmm_fwd`, `bmm_bias_fwd`, `baddbmm_bias_fwd`: x_k W'_k^T as one batched GEMM, without the bias, with an
  in-place add of it after, and as baddbmm from the broadcast bias;
- `seg_addmm_fwd`, `seg_mm_dgrad`: the same per trial, one cuBLAS GEMM each (bias in the epilogue), written into
  the pack's output rows;
- `bmm_dgrad`: g_k W'_k as one batched GEMM;
- `fold_r<r>`: the K folds W + s B_k A_k (one baddbmm);
- `grads_bmm_r<r>`: A's and B's gradients as four batched skinny GEMMs;
- `current_site_r<r>`, `fold_site_r<r>`: a whole site forward and backward (autograd), the grouped path as it
  is against the fold (`bmm_bias` forward, `bmm_dgrad` and `grads_bmm` backward).

    python bench/profile/grouped_fold_parts.py --out DIR   # CUDA only: DIR/grouped_fold_parts-<device>-<date>.json
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapter_parts import time_cases

K, T = 8, 4096
SHAPES = ((1024, 1024), (1024, 4096), (4096, 1024))
RANKS = (8, 32)
REPS = 10


class _Fold(torch.autograd.Function):
    """The folded site: y_k = x_k (W + s B_k A_k)^T + b, input and low-rank gradients by batched GEMMs."""

    @staticmethod
    def forward(ctx, x3, w, b, A, Bt, s):
        wf = torch.baddbmm(w.expand(A.shape[0], -1, -1), Bt.transpose(1, 2), A, alpha=s)
        y = torch.bmm(x3, wf.transpose(1, 2))
        y.add_(b)
        ctx.save_for_backward(x3, wf, A, Bt)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, g):
        x3, wf, A, Bt = ctx.saved_tensors
        gx = torch.bmm(g, wf)
        gb = torch.bmm(g, Bt.transpose(1, 2))
        xa = torch.bmm(x3, A.transpose(1, 2))
        ga = torch.baddbmm(A, gb.transpose(1, 2), x3, beta=0, alpha=ctx.s)
        gbt = torch.baddbmm(Bt, xa.transpose(1, 2), g, beta=0, alpha=ctx.s)
        return gx, None, None, ga, gbt, None


def cases() -> dict[str, Callable[[], object]]:
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    out: dict[str, Callable[[], object]] = {}
    for a, b in SHAPES:
        p = f"{a}x{b}_"
        x3 = torch.randn(K, T, a, device=dev, dtype=bf16)
        x2 = x3.view(-1, a)
        g3 = torch.randn(K, T, b, device=dev, dtype=bf16)
        g2 = g3.view(-1, b)
        w = torch.randn(b, a, device=dev, dtype=bf16) * a ** -0.5
        bias = torch.randn(b, device=dev, dtype=bf16)
        wf = w.expand(K, b, a).contiguous()
        y = torch.empty(K, T, b, device=dev, dtype=bf16)
        gx = torch.empty(K, T, a, device=dev, dtype=bf16)
        out[p + "floor_fwd"] = lambda x2=x2, w=w, bias=bias: F.linear(x2, w, bias)
        out[p + "floor_dgrad"] = lambda g2=g2, w=w: g2 @ w
        out[p + "bmm_fwd"] = lambda x3=x3, wf=wf: torch.bmm(x3, wf.transpose(1, 2))
        out[p + "bmm_bias_fwd"] = lambda x3=x3, wf=wf, bias=bias: torch.bmm(x3, wf.transpose(1, 2)).add_(bias)
        out[p + "baddbmm_bias_fwd"] = lambda x3=x3, wf=wf, bias=bias, b=b: torch.baddbmm(
            bias.view(1, 1, b).expand(K, T, b), x3, wf.transpose(1, 2))
        out[p + "seg_addmm_fwd"] = lambda x3=x3, wf=wf, bias=bias, y=y: [
            torch.addmm(bias, x3[k], wf[k].t(), out=y[k]) for k in range(K)]
        out[p + "bmm_dgrad"] = lambda g3=g3, wf=wf: torch.bmm(g3, wf)
        out[p + "seg_mm_dgrad"] = lambda g3=g3, wf=wf, gx=gx: [torch.mm(g3[k], wf[k], out=gx[k]) for k in range(K)]
        for r in RANKS:
            A = torch.randn(K, r, a, device=dev) * a ** -0.5
            Bt = torch.randn(K, r, b, device=dev) * 0.01
            Ab, Btb = A.to(bf16), Bt.to(bf16)
            out[p + f"fold_r{r}"] = lambda w=w, Ab=Ab, Btb=Btb: torch.baddbmm(
                w.expand(K, -1, -1), Btb.transpose(1, 2), Ab, alpha=2.0)

            def grads(x3=x3, g3=g3, Ab=Ab, Btb=Btb):
                gb = torch.bmm(g3, Btb.transpose(1, 2))
                xa = torch.bmm(x3, Ab.transpose(1, 2))
                return torch.bmm(gb.transpose(1, 2), x3), torch.bmm(xa.transpose(1, 2), g3)

            out[p + f"grads_bmm_r{r}"] = grads
            xl = x3.clone().requires_grad_(True)
            Al, Btl = A.clone().requires_grad_(True), Bt.clone().requires_grad_(True)

            def current(xl=xl, Al=Al, Btl=Btl, w=w, bias=bias, g3=g3, a=a):
                """packing.PackedLinear._grouped's LoRA path: shared GEMM, x A^T, accumulated B into y in place."""
                z = F.linear(xl.view(-1, a), w, bias)
                yv = torch.ops.aten._unsafe_view(z, (K, T, -1))
                xa = torch.bmm(xl, Al.to(bf16).transpose(1, 2))
                yv = yv.baddbmm_(xa, Btl.to(bf16), alpha=2.0)
                torch.autograd.backward(yv, g3)

            def fold(xl=xl, Al=Al, Btl=Btl, w=w, bias=bias, g3=g3):
                yv = _Fold.apply(xl, w, bias, Al.to(bf16), Btl.to(bf16), 2.0)
                torch.autograd.backward(yv, g3)

            def floor_site(xl=xl, w=w, bias=bias, g3=g3, a=a):
                torch.autograd.backward(F.linear(xl.view(-1, a), w, bias), g3.view(-1, g3.shape[-1]))

            out[p + f"current_site_r{r}"] = current
            out[p + f"fold_site_r{r}"] = fold
            if r == RANKS[0]:
                out[p + "floor_site"] = floor_site
    return out


def main() -> None:
    time_cases("grouped_fold_parts", __doc__, cases,
               f"each case captured {REPS} times in one CUDA graph; a pack of K={K} trials x T={T} rows, bf16 "
               "activations, fp32 adapter leaves cast per call; per call = replay time / calls", reps=REPS)


if __name__ == "__main__":
    main()
