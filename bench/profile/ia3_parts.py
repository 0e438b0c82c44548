"""What one IA3 site costs, forward and backward, inside a CUDA graph, each way "auto" could run it, at
roberta-large size (4,096 rows, bf16): the ffn_out linear (4,096 -> 1,024, its input scaled) and a key/value
linear (1,024 -> 1,024, its output scaled); the frozen linear alone (the floor's share) beside them.

Why: graphed, IA3 on k, v, ffn_out ran 1.21x the frozen floor at roberta-large size against a 1.15x target
(bench/results/kernels_graphed_auto-h200-2026-11-30.json), and by bytes its rescalings of the activations were
the suspect: `kernels.ia3_fold` moves the scales into the weight. This times, per site:
- `floor`: the frozen linear, forward and its input gradient;
- `reference`: PyTorch's broadcasting multiplies (kernels off);
- `rowscale`: the Triton `scale_rows` around cuBLAS (what "auto" ran graphed before the fold);
- `fold`: `ia3_fold.ia3_linear`;
and the fold's parts: the weight fold alone, and its column sums for each block width and row split.

    python bench/profile/ia3_parts.py --out DIR      # CUDA only; writes DIR/ia3_parts-<device>-<date>.json
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapter_parts import time_cases

from autopeft.kernels import ia3_fold, reference, rowscale

M = 4096
#: site -> (in features, out features, which side is scaled)
SITES = {"ffn_out": (4096, 1024, "in"), "kv": (1024, 1024, "out")}
WAYS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": reference.ia3_linear, "rowscale": rowscale.ia3_linear, "fold": ia3_fold.ia3_linear}


def site_cases(name: str, n_in: int, n_out: int, side: str) -> dict[str, Callable[[], object]]:
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    x = torch.randn(M, n_in, device=dev, dtype=bf16, requires_grad=True)
    w = torch.randn(n_out, n_in, device=dev, dtype=bf16) * n_in**-0.5
    b = torch.randn(n_out, device=dev, dtype=bf16)
    s = (1 + 0.1 * torch.randn(n_in if side == "in" else n_out, device=dev, dtype=bf16)).requires_grad_(True)
    g = torch.randn(M, n_out, device=dev, dtype=bf16)
    out: dict[str, Callable[[], object]] = {
        f"{name}_floor": lambda: torch.autograd.grad(torch.nn.functional.linear(x, w, b), [x], g)}
    for way, fn in WAYS.items():
        out[f"{name}_{way}"] = lambda fn=fn: torch.autograd.grad(fn(x, w, b, **{f"scale_{side}": s}), [x, s], g)
    with torch.no_grad():
        out[f"{name}_fold_weight_only"] = lambda: ia3_fold.fold_weight(w, b, s if side == "out" else None,
                                                                       s if side == "in" else None, bf16)
        a = torch.randn(M, n_in if side == "in" else n_out, device=dev, dtype=bf16)
        c = torch.randn_like(a)
        for block_f in (32, 64, 128):
            for min_programs in (1, 132, 528, 1056):
                out[f"{name}_colsum_bf{block_f}_min{min_programs}"] = (
                    lambda bf=block_f, mp=min_programs: ia3_fold.colsum_div(a, c, s.detach(), block_f=bf,
                                                                            min_programs=mp))
        out[f"{name}_colsum_torch_mul_sum"] = lambda: (a * c).sum(0, dtype=torch.float32).div_(s.detach())
    return out


def main() -> None:
    time_cases("ia3_parts", __doc__,
               lambda: {case: fn for name, site in SITES.items() for case, fn in site_cases(name, *site).items()},
               f"each case captured 20 times in one CUDA graph; M={M} rows, bf16; sites {SITES} (in, out, scaled "
               "side); per call = replay time / calls; forward + backward (autograd.grad of the input and the "
               "scale) for the site cases", reps=20)


if __name__ == "__main__":
    main()
