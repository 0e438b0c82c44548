"""What the folded LoRA linear (kernels/lora_fold.py) spends beyond the frozen linear, per part, inside a CUDA
graph, at the shapes of the issue's two models (4,096 rows at roberta-large size, 8,192 at Llama 1.1B size;
bf16, rank 8): the fold kernel W' = W + s B A for each tile choice, and the four skinny GEMMs of A's and B's
gradients.

Why: graphed, LoRA r8 on all linears ran 1.455x the frozen floor at roberta-large size against a 1.25x target
(bench/results/kernels_fold_all-h200-2026-11-30.json); its profile put 0.8 ms of the 20.5 ms step in the 144
folds (5.6 us each, about twice their bandwidth bound) and about 2.5 ms in the skinny GEMMs and their split-K
reduces. Cases:
- `<shape>_floor`: the frozen linear, forward and input gradient;
- `<shape>_lora_fold`: `lora_fold.lora_linear`, forward and the input, A and B gradients;
- `<shape>_fold_<rows>x<cols>w<warps>`: the fold kernel alone with that tile;
- `<shape>_copy`: a device copy of W, the fold's bandwidth bound (it reads W and writes W');
- `<shape>_xa`, `_gb`, `_ga`, `_gB`: x A^T, g B, s (g B)^T x and s g^T (x A^T) as cuBLAS GEMMs;
- `<shape>_grads_cublas` against `_grads_lowrank`: A's and B's gradients, those four GEMMs (`lora_fold._cublas_grads`)
  against the three Triton launches of `kernels.lowrank_grads`; also for q, k and v on one input (`*_qkv_*`);
  `_grads_lowrank_<knob>` with one of its tiles or splits changed, `_rows_only` / `_rows_cols` its first one or
  two launches alone;
- `<shape>_fold_tc_*`: the fold with B A on the tensor cores;
- `*_qkv_fold_each` against `*_qkv_fold_grouped`: q's, k's and v's folds, a launch each or one for the three;
  `*_qkv_fold_grouped_bt` also writes the three B^T's, as the step's folds do.

    python bench/profile/lora_fold_parts.py --out DIR      # CUDA only; writes DIR/lora_fold_parts-<device>-<date>.json
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapter_parts import REPS, time_cases

from autopeft.kernels import lora_fold, lowrank_grads

RANK, SCALING = 8, 2.0
#: shape name -> (rows, in features, out features)
SHAPES = {"rb_1024x1024": (4096, 1024, 1024), "rb_1024to4096": (4096, 1024, 4096),
          "rb_4096to1024": (4096, 4096, 1024), "ll_2048x2048": (8192, 2048, 2048),
          "ll_2048to256": (8192, 2048, 256), "ll_2048to5632": (8192, 2048, 5632),
          "ll_5632to2048": (8192, 5632, 2048)}
#: q, k, v groups: (rows, in features, the three out features)
GROUPS = {"rb_qkv": (4096, 1024, [1024, 1024, 1024]), "ll_qkv": (8192, 2048, [2048, 256, 256])}
#: the fold's tiles timed (ten were swept in lora_fold_parts_knobs-h200-2026-11-30.json; these were the fastest)
TILES = [(64, 64, 4), (32, 256, 4), (128, 128, 8)]


#: lowrank_grads's tiles and splits, set for a case (module attributes read at each call)
LOWRANK_KNOBS = {"rows_only": {"PASSES": 1}, "rows_cols": {"PASSES": 2}, "rowbm64": {"ROW_BM": 64},
                 "qkvbm32": {"ROW_BM_QKV": 32}, "widebk128": {"WIDE_BK": 128}, "fin1024": {"FINISH_BLOCK": 1024},
                 "min264": {"MIN_PROGRAMS": 264}, "sepfinish": {"FINISH_IN_COLS": False}, "rowbm16": {"ROW_BM": 16}}


def _with(knobs: dict[str, int], fn: Callable[[], object]) -> object:
    before = {k: getattr(lowrank_grads, k) for k in knobs}
    for k, v in knobs.items():
        setattr(lowrank_grads, k, v)
    try:
        return fn()
    finally:
        for k, v in before.items():
            setattr(lowrank_grads, k, v)


def cases() -> dict[str, Callable[[], object]]:
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    out: dict[str, Callable[[], object]] = {}
    for name, (m, k, n) in SHAPES.items():
        x = torch.randn(m, k, device=dev, dtype=bf16, requires_grad=True)
        w = torch.randn(n, k, device=dev, dtype=bf16) * k**-0.5
        b = torch.randn(n, device=dev, dtype=bf16)
        A = (torch.randn(RANK, k, device=dev) * k**-0.5).requires_grad_(True)
        B = (torch.randn(n, RANK, device=dev) * 0.01).requires_grad_(True)
        g = torch.randn(m, n, device=dev, dtype=bf16)
        out[f"{name}_floor"] = lambda x=x, w=w, b=b, g=g: torch.autograd.grad(
            torch.nn.functional.linear(x, w, b), [x], g)
        out[f"{name}_lora_fold"] = lambda x=x, w=w, b=b, A=A, B=B, g=g: torch.autograd.grad(
            lora_fold.lora_linear(x, w, b, A, B, SCALING), [x, A, B], g)
        with torch.no_grad():
            Ab, Bb, xd = A.detach().to(bf16), B.detach().to(bf16), x.detach()
            for tiles in TILES:
                out[f"{name}_fold_{tiles[0]}x{tiles[1]}w{tiles[2]}"] = (
                    lambda w=w, Ab=Ab, Bb=Bb, t=tiles: lora_fold.fold_weight(w, Ab, Bb, SCALING, bf16, tiles=t))
            for tiles in ((64, 64, 4), (32, 256, 4), (128, 128, 8)):
                out[f"{name}_fold_tc_{tiles[0]}x{tiles[1]}w{tiles[2]}"] = (
                    lambda w=w, Ab=Ab, Bb=Bb, t=tiles: lora_fold.fold_weight(w, Ab, Bb, SCALING, bf16, tiles=t,
                                                                            tensor_cores=True))
            out[f"{name}_copy"] = lambda w=w: w.clone()
            xa, gb = xd @ Ab.t(), g @ Bb
            out[f"{name}_xa"] = lambda xd=xd, Ab=Ab: xd @ Ab.t()
            out[f"{name}_gb"] = lambda g=g, Bb=Bb: g @ Bb
            out[f"{name}_ga"] = lambda gb=gb, xd=xd: lora_fold._scaled_mm(gb.t(), xd, SCALING, xd[0])
            out[f"{name}_gB"] = lambda g=g, xa=xa: lora_fold._scaled_mm(g.t(), xa, SCALING, xa[0])
            out[f"{name}_grads_cublas"] = lambda xd=xd, g=g, Ab=Ab, Bb=Bb: lora_fold._cublas_grads(
                xd, {0: g}, [Ab], [Bb], [SCALING], [True], [True])
            Bt = Bb.t().contiguous()  # as the fold writes it for the backward
            out[f"{name}_grads_lowrank"] = lambda xd=xd, g=g, Ab=Ab, Bt=Bt: lowrank_grads.lowrank_grads(
                xd, [g], [Ab], [Bt], [SCALING])
            for label, knobs in LOWRANK_KNOBS.items():
                out[f"{name}_grads_lowrank_{label}"] = lambda xd=xd, g=g, Ab=Ab, Bt=Bt, kn=knobs: _with(
                    kn, lambda: lowrank_grads.lowrank_grads(xd, [g], [Ab], [Bt], [SCALING]))
    for name, (m, k, ns) in GROUPS.items():  # q, k and v on one input: one x A^T, the A gradients stacked
        with torch.no_grad():
            xd = torch.randn(m, k, device=dev, dtype=bf16)
            gs = [torch.randn(m, n, device=dev, dtype=bf16) for n in ns]
            As = [torch.randn(RANK, k, device=dev, dtype=bf16) * k**-0.5 for _ in ns]
            Bs = [torch.randn(n, RANK, device=dev, dtype=bf16) * 0.01 for n in ns]
            out[f"{name}_grads_cublas"] = lambda xd=xd, gs=gs, As=As, Bs=Bs: lora_fold._cublas_grads(
                xd, dict(enumerate(gs)), As, Bs, [SCALING] * 3, [True] * 3, [True] * 3)
            Bts = [B.t().contiguous() for B in Bs]
            out[f"{name}_grads_lowrank"] = lambda xd=xd, gs=gs, As=As, Bts=Bts: lowrank_grads.lowrank_grads(
                xd, gs, As, Bts, [SCALING] * 3)
            ws = [torch.randn(n, k, device=dev, dtype=bf16) * k**-0.5 for n in ns]
            out[f"{name}_fold_grouped_bt"] = lambda ws=ws, As=As, Bs=Bs: lora_fold.fold_weights(
                ws, As, Bs, [SCALING] * 3, bf16, transposed_Bs=[])
            out[f"{name}_fold_each"] = lambda ws=ws, As=As, Bs=Bs: [
                lora_fold.fold_weight(w, A, B, SCALING, bf16) for w, A, B in zip(ws, As, Bs, strict=True)]
            out[f"{name}_fold_grouped"] = lambda ws=ws, As=As, Bs=Bs: lora_fold.fold_weights(
                ws, As, Bs, [SCALING] * 3, bf16)
            for label, knobs in LOWRANK_KNOBS.items():
                out[f"{name}_grads_lowrank_{label}"] = lambda xd=xd, gs=gs, As=As, Bts=Bts, kn=knobs: _with(
                    kn, lambda: lowrank_grads.lowrank_grads(xd, gs, As, Bts, [SCALING] * 3))
    return out


def main() -> None:
    time_cases("lora_fold_parts", __doc__, cases,
               f"each case captured {REPS} times in one CUDA graph; bf16, rank {RANK}; shapes (rows, in, out) "
               f"{SHAPES}; per call = replay time / calls")


if __name__ == "__main__":
    main()
