"""What each way of computing a bottleneck adapter's launch-bound pieces costs inside a CUDA graph, at
roberta-large size (4096 rows of 1024, bottleneck 64, bf16).

Why: graphed, the serial adapter at roberta-large size ran 1.16x the frozen floor against a 1.15x target, and
its profile (bench/results/kernels_serial_profile-h200-2026-11-30.json) showed the up-projection's bias
gradient (`sum(0)` over the (M, hidden) output gradient: 49 calls, 9 us each) as its largest own kernel. This
times the candidates one by one, each replayed many times in one graph, so a choice in `kernels.accumulate`
rests on a measurement rather than on a guess at cuBLAS's or the reduction's speed:
- column sums of an (M, n) gradient: `sum(0)` in its dtype or fp32, `mv` with a ones vector (its fill
  included), a (1, M) ones row times the gradient;
- the down-projection with bias and ReLU: `F.linear` + `relu` against `_addmm_activation` (cuBLASLt epilogue);
- a serial adapter's input gradient: `mm` then an in-place add of the output gradient, against `addmm`.

    python bench/profile/adapter_parts.py --out DIR      # CUDA only; writes DIR/adapter_parts-<device>-<date>.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_results

M, HIDDEN, SIZE, REPS = 4096, 1024, 64, 50


def graphed_us(fn: Callable[[], object], reps: int = REPS, replays: int = 20) -> float:
    """Microseconds per call of `fn`, captured `reps` times in one graph (no launch cost beyond a replay's)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * reps)


def cases() -> dict[str, Callable[[], object]]:
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    g = torch.randn(M, HIDDEN, device=dev, dtype=bf16)
    gs = torch.randn(M, SIZE, device=dev, dtype=bf16)
    x = torch.randn(M, HIDDEN, device=dev, dtype=bf16)
    dw, db = torch.randn(SIZE, HIDDEN, device=dev, dtype=bf16) * HIDDEN**-0.5, torch.randn(SIZE, device=dev, dtype=bf16)
    ones_row = torch.ones(1, M, device=dev, dtype=bf16)
    out = {}
    for name, t in (("hidden", g), ("size", gs)):
        out[f"colsum_{name}_sum"] = lambda t=t: t.sum(0)
        out[f"colsum_{name}_sum_fp32"] = lambda t=t: t.sum(0, dtype=torch.float32)
        out[f"colsum_{name}_mv_with_fill"] = lambda t=t: torch.mv(t.t(), torch.ones(M, device=dev, dtype=bf16))
        out[f"colsum_{name}_ones_row_mm"] = lambda t=t: ones_row @ t
    out["down_linear_relu"] = lambda: F.relu(F.linear(x, dw, db))
    out["down_addmm_activation"] = lambda: torch._addmm_activation(db, x, dw.t())
    out["input_grad_mm_add_"] = lambda: (gs @ dw).add_(g)
    out["input_grad_addmm"] = lambda: torch.addmm(g, gs, dw)
    return out


def time_cases(bench: str, doc: str, cases: Callable[[], dict[str, Callable[[], object]]], notes: str,
               reps: int = REPS) -> None:
    """A parts profile's command line: each case timed in a graph and printed, then DIR/<bench>-<device>-<date>.json."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--only", default="", help="comma-separated substrings: time only the cases naming one")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    if not torch.cuda.is_available():
        sys.exit(f"{bench}.py times CUDA graphs: it needs a CUDA GPU")
    rows = []
    for name, fn in cases().items():
        if only and not any(s in name for s in only):
            continue
        us = graphed_us(fn, reps=reps)
        rows.append({"case": name, "us_per_call": us})
        print(f"{name:36s} {us:8.2f} us", flush=True)
    summary = {r["case"] + "_us": r["us_per_call"] for r in rows}
    write_results(bench, rows, summary, args.out, device=torch.device("cuda"), notes=notes)


def main() -> None:
    time_cases("adapter_parts", __doc__, cases,
               f"each case captured {REPS} times in one CUDA graph; M={M}, hidden={HIDDEN}, size={SIZE}, bf16; "
               "per call = replay time / calls")


if __name__ == "__main__":
    main()
