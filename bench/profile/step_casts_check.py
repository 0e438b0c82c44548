"""Do the per-step casts (`autopeft.kernels.casts`) change any gradient on this device? Per parameter, eager and
(on CUDA) graphed.

Why: on CPU the cast-once path is bitwise the per-use one (tests/peft/test_step_casts.py), but GPU kernels see
other pointers (views into one buffer). On an H200 this check found SDPA's backward giving other gradients for
prefix tensors read through casts at unaligned offsets (relative errors 0.2-2.2); with every cast aligned
(`casts.ALIGN`) all gradients are bitwise equal there, prefixes included
(bench/results/step_casts_check-h200-2026-11-30.json).

    python bench/profile/step_casts_check.py                  # CUDA if present; prints every parameter's error
    python bench/profile/step_casts_check.py --out bench/results   # and a results JSON

Each way (eager, graphed) is compared with the same way using per-use casts; the per-use eager step run twice
gives the device's run-to-run noise, printed beside it. Exit status 1 when any gradient differs by more than
--tol (relative).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from autopeft.kernels import casts

SPEC = {"lora": {"rank": {"q": 4, "k": 4, "v": 4, "o": 4, "ffn_in": 4}}, "ia3": ["ffn_out"],
        "serial_adapter": {"size": 8}, "parallel_adapter": {"size": 8}, "prefix": {"length": 3}}


def build(device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig

    from autopeft.peft import inject
    from autopeft.spec import PeftSpec

    cfg = BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa").to(
        device, torch.bfloat16)
    inject(model, PeftSpec.from_dict(SPEC, num_layers=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "autopeft_" in name:
                p.normal_(0.0, 0.2)  # away from identity inits: every gradient non-trivial
    return model.train()


def gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor], use_casts: bool, graphed: bool
              ) -> list[torch.Tensor]:
    """One step's gradients, with the per-step casts or with per-use casts (`casts.begin` disabled)."""
    from autopeft.cuda_graphs import GraphedStep

    params = [p for p in model.parameters() if p.requires_grad]
    begin: Callable = casts.begin
    if not use_casts:
        casts.begin = lambda params, dtype: casts._casts.clear()
    try:
        for p in params:
            p.grad = None

        def step(b: dict[str, torch.Tensor]) -> torch.Tensor:
            loss = model(**b).loss
            loss.backward()
            return loss.detach()

        if graphed:
            g = GraphedStep(step, params)
            for _ in range(3):  # warm-up + capture, then replays
                g.zero_grad()
                g(batch)
            if g.failure:
                raise RuntimeError(f"capture failed: {g.failure}")
        else:
            step(batch)
        return [p.grad.detach().clone() for p in params]
    finally:
        casts.begin = begin


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tol", type=float, default=0.0, help="largest relative error allowed (default: bitwise)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write a results JSON to this dir (step_casts_check-<device>-<date>)")
    args = ap.parse_args()
    device = torch.device(args.device)
    model = build(device)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ids = torch.randint(5, 1000, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.zeros(4, dtype=torch.long, device=device)}
    # Each way with per-use casts is its own reference (graph capture may pick other kernels than eager), and the
    # eager reference run twice is the device's own run-to-run noise: a cast error at that level is not the casts'.
    modes = [False] + ([True] if device.type == "cuda" else [])
    ref = {graphed: gradients(model, batch, use_casts=False, graphed=graphed) for graphed in modes}
    rows = [{"way": "noise (per-use eager, twice)", "param": n, "rel_err": _rel(g, r)}
            for n, g, r in zip(names, gradients(model, batch, use_casts=False, graphed=False), ref[False], strict=True)]
    for graphed in modes:
        got = gradients(model, batch, use_casts=True, graphed=graphed)
        rows += [{"way": "graphed" if graphed else "eager", "param": n, "rel_err": _rel(g, r)}
                 for n, g, r in zip(names, got, ref[graphed], strict=True)]
    for row in rows:
        print(f"{row['way']:28s} {row['rel_err']:9.2e}  {row['param']}")
    summary = {f"max_rel_err_{way.split()[0]}": max(r["rel_err"] for r in rows if r["way"] == way)
               for way in dict.fromkeys(r["way"] for r in rows)}
    worst = max(v for k, v in summary.items() if k != "max_rel_err_noise")
    print(f"largest relative error: {worst:.2e} (tolerance {args.tol:g}; noise {summary['max_rel_err_noise']:.2e})")
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from common import write_results

        write_results("step_casts_check", rows, summary, args.out, device=device,
                      notes=f"spec {SPEC}; tolerance {args.tol:g}")
    return int(worst > args.tol)


def _rel(g: torch.Tensor, r: torch.Tensor) -> float:
    return ((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)).item()


if __name__ == "__main__":
    sys.exit(main())
