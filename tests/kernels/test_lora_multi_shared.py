"""A `SharedInputLora` group (q/k/v) on the Triton path: the fused multi-LoRA kernel behind three PeftLinears
gives each its own linear's output and gradients (vs the fp64 reference of unshared linears)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopeft.kernels import fused
from autopeft.peft.linear import PeftLinear, SharedInputLora
from tests.kernels.compare import TOL, rel_err


def test_group_on_triton_matches_unshared_reference(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    multi = fused.lora_linear_multi
    monkeypatch.setattr(fused, "lora_linear_multi", lambda *a, **k: calls.append(1) or multi(*a, **k))
    K = 48
    mods = []
    for n, r, ia3 in ((40, 4, False), (24, 2, True), (24, 8, False)):  # GQA-like widths, one IA3 output scale
        base = nn.Linear(K, n, bias=n == 40)
        mods.append(PeftLinear(base, "k" if ia3 else "q", rank=r, alpha=2.0 * r, ia3=ia3))
        with torch.no_grad():
            mods[-1].autopeft_lora_B.normal_()
            if ia3:
                mods[-1].autopeft_ia3.uniform_(0.5, 1.5)
    for m in mods:
        m.requires_grad_(False)
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith("autopeft_"))
    group = SharedInputLora(mods)
    for i, m in enumerate(mods):
        m.lora_group, m.lora_group_slot = group, i
    x = torch.randn(3, 13, K, requires_grad=True)
    ys = [m(x) for m in mods]  # the first computes all three in one fused call, the others take theirs
    assert group._x is None and len(calls) == 1, "one fused call for the three"

    xr = x.detach().double().requires_grad_(True)
    refs = []
    for m in mods:
        params = {n: p.detach().double().requires_grad_(p.requires_grad) for n, p in m.named_parameters()}
        b = params.get("base_layer.bias")
        y = torch.nn.functional.linear(xr, params["base_layer.weight"], b)
        y = y + m.scaling * (xr @ params["autopeft_lora_A"].t()) @ params["autopeft_lora_B"].t()
        refs.append((y * params["autopeft_ia3"] if m.ia3 else y, params))
    tol = TOL[torch.float32]
    for y, (r, _) in zip(ys, refs, strict=True):
        assert rel_err(y, r) <= tol, seed
    gs = [torch.randn(r.shape, dtype=torch.float64) for r, _ in refs]
    sum((y * g.float()).sum() for y, g in zip(ys, gs, strict=True)).backward()
    sum((r * g).sum() for (r, _), g in zip(refs, gs, strict=True)).backward()
    assert rel_err(x.grad, xr.grad) <= tol, seed
    for m, (_, params) in zip(mods, refs, strict=True):
        for name, p in m.named_parameters():
            if p.requires_grad:
                assert rel_err(p.grad, params[name].grad) <= tol, (name, seed)
