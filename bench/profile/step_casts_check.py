"""Do the per-step casts (`autopeft.kernels.casts`) change any gradient on this device? Per parameter, eager and
(on CUDA) graphed.

Why: on CPU the cast-once path is bitwise the per-use one (tests/peft/test_step_casts.py), but GPU kernels see
other pointers (views into one buffer). On an H200 this check found SDPA's backward giving other gradients for
prefix tensors read through their casts (relative errors 0.2-2.2, the other methods' tensors below that), which is
why `inject` leaves prefixes out. `--prefix-casts` puts them back in, to rerun that check on the aligned buffer.

    python bench/profile/step_casts_check.py                  # CUDA if present; prints every parameter's error
    python bench/profile/step_casts_check.py --prefix-casts   # prefixes cast once per step too

Exit status 1 when any gradient differs by more than --tol (relative).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from autopeft.kernels import casts

SPEC = {"lora": {"rank": {"q": 4, "k": 4, "v": 4, "o": 4, "ffn_in": 4}}, "ia3": ["ffn_out"],
        "serial_adapter": {"size": 8}, "parallel_adapter": {"size": 8}, "prefix": {"length": 3}}


def build(device: torch.device, prefix_casts: bool) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig

    from autopeft.peft import inject
    from autopeft.spec import PeftSpec

    cfg = BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa").to(
        device, torch.bfloat16)
    if prefix_casts:  # inject's list, prefixes included: a second pair of hooks casting them too
        real = casts.install
        casts.install = lambda m, params: real(m, [p for n, p in m.named_parameters()
                                                   if "autopeft_" in n and "dora_magnitude" not in n])
    try:
        inject(model, PeftSpec.from_dict(SPEC, num_layers=2))
    finally:
        if prefix_casts:
            casts.install = real
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
    ap.add_argument("--prefix-casts", action="store_true", help="cast the prefixes once per step too")
    ap.add_argument("--tol", type=float, default=0.0, help="largest relative error allowed (default: bitwise)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    model = build(device, args.prefix_casts)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ids = torch.randint(5, 1000, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.zeros(4, dtype=torch.long, device=device)}
    ref = gradients(model, batch, use_casts=False, graphed=False)
    worst = 0.0
    for graphed in [False] + ([True] if device.type == "cuda" else []):
        got = gradients(model, batch, use_casts=True, graphed=graphed)
        for name, g, r in zip(names, got, ref, strict=True):
            err = ((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)).item()
            worst = max(worst, err)
            print(f"{'graphed' if graphed else 'eager':7s} {err:9.2e}  {name}")
    print(f"largest relative error: {worst:.2e} (tolerance {args.tol:g})")
    return int(worst > args.tol)


if __name__ == "__main__":
    sys.exit(main())
