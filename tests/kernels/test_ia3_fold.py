"""IA3 folded into the frozen weight (`kernels.ia3_fold`) against the fp64 reference: output, input gradient and
each scale's gradient, which the fold recovers by dividing a column sum by the scale."""

from __future__ import annotations

import pytest
import torch

from autopeft.kernels import ia3_fold, reference
from tests.kernels.compare import act, check_op, frozen, param, rel_err


def _scales(side: str, n_out: int, n_in: int, like: torch.dtype) -> dict[str, torch.Tensor]:
    kw = {}
    if side in ("out", "both"):
        kw["scale_out"] = (param(n_out, scale=0.5, like=like) + 1).detach().requires_grad_(True)
    if side in ("in", "both"):
        kw["scale_in"] = (param(n_in, scale=0.5, like=like) + 1).detach().requires_grad_(True)
    return kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["out", "in", "both"])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_ia3_is_the_reference(dtype: torch.dtype, side: str, bias: bool, seed: int) -> None:
    """Odd sizes (not multiples of any block), leading batch dims as a model passes them."""
    x = act(3, 37, 72, dtype=dtype)
    w = frozen(50, 72, dtype=dtype, scale=72**-0.5)
    b = frozen(50, dtype=dtype) if bias else None
    check_op("ia3_linear", [x, w, b], _scales(side, 50, 72, dtype), dtype, seed, fn=ia3_fold.ia3_linear)


@pytest.mark.parametrize("side", ["out", "in"])
def test_a_scale_at_zero_still_gets_its_gradient(side: str) -> None:
    """A scale of exactly 0 wipes the scaled tensor, from which the fold's division would recover the gradient:
    it is used as TINY instead, so the output is the reference's (to far below rounding) and the gradient too."""
    x = act(64, 40, dtype=torch.float32)
    w, b = frozen(24, 40, dtype=torch.float32, scale=40**-0.5), frozen(24, dtype=torch.float32)
    n = 24 if side == "out" else 40
    s = torch.linspace(-1.0, 1.0, n)
    s[3] = 0.0
    s[5] = -1e-30
    s.requires_grad_(True)
    key = f"scale_{side}"
    r = torch.randn(64, 24)  # a loss whose gradient at a zeroed output is not zero
    got = ia3_fold.ia3_linear(x, w, b, **{key: s})
    gx, gs = torch.autograd.grad((got * r).sum(), [x, s])
    ref = reference.ia3_linear(x, w, b, **{key: s})
    rx, rs = torch.autograd.grad((ref * r).sum(), [x, s])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs, rs, rtol=1e-4, atol=1e-4)
    assert rs[3].abs() > 1e-3  # the case is not vacuous: that scale's true gradient is not zero


@pytest.mark.parametrize("rows", [5, 300])
@pytest.mark.parametrize("min_programs", [1, 128])
def test_colsum_div_one_pass_and_split(rows: int, min_programs: int) -> None:
    """Both ways of summing a column (one program over all rows, or partial sums and a second kernel) give
    Σ a ⊙ b / s in s's dtype; a short last block of rows and of columns included."""
    a, b = torch.randn(rows, 70), torch.randn(rows, 70)
    s = torch.rand(70) + 0.5
    got = ia3_fold.colsum_div(a, b, s, block_f=32, min_programs=min_programs)
    want = (a.double() * b.double()).sum(0) / s.double()
    assert got.dtype == s.dtype
    assert rel_err(got, want) < 1e-5


def test_a_trained_weight_or_bias_takes_the_path_before_the_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The folded GEMM gives no weight or bias gradient: a BitFit bias beside IA3 goes the way "auto" took in a
    graphed step before the fold (`rowscale.ia3_linear`), with every gradient."""
    from autopeft.kernels import rowscale

    taken = []
    ia3_rowscale = rowscale.ia3_linear
    monkeypatch.setattr(rowscale, "ia3_linear", lambda *a, **k: taken.append(1) or ia3_rowscale(*a, **k))
    x = act(4, 8, dtype=torch.float32)
    w = frozen(6, 8, dtype=torch.float32)
    b = torch.randn(6, requires_grad=True)
    s = (torch.rand(6) + 0.5).requires_grad_(True)
    assert not ia3_fold.supported(torch.float32, w, b)
    ia3_fold.ia3_linear(x, w, b, scale_out=s).sum().backward()
    assert taken == [1]
    assert b.grad is not None and s.grad is not None
    assert not ia3_fold.supported(torch.float16, w, None)  # fp16 cannot hold TINY x y
