"""`kernels.lowrank_grads` against the fp64 formulas: one to three linears on one input, odd sizes that leave
partial row, column and rank blocks, rows split into several partial sums, each linear its own scaling."""

from __future__ import annotations

import pytest
import torch

from autopeft.kernels import lowrank_grads
from tests.kernels.compare import TOL, rel_err


def _case(m: int, k: int, ns: list[int], ranks: list[int], scalings: list[float], dtype: torch.dtype) -> None:
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    gs = [torch.randn(m, n, dtype=torch.float64).to(dtype) for n in ns]
    As = [(torch.randn(r, k, dtype=torch.float64) * k**-0.5).to(dtype) for r in ranks]
    Bs = [torch.randn(n, r, dtype=torch.float64).to(dtype) for n, r in zip(ns, ranks, strict=True)]
    assert lowrank_grads.supported(x, gs, As)
    dA, dB = lowrank_grads.lowrank_grads(x, gs, As, [B.t().contiguous() for B in Bs], scalings)
    xd = x.double()
    for i, (g, A, B, s) in enumerate(zip(gs, As, Bs, scalings, strict=True)):
        ref_A = s * (g.double() @ B.double()).t() @ xd
        ref_B = s * g.double().t() @ (xd @ A.double().t())
        assert dA[i].dtype == dtype and dA[i].shape == A.shape and dB[i].shape == B.shape
        assert dA[i].is_contiguous() and dB[i].is_contiguous()  # as a parameter's .grad is laid out
        for name, got, ref in (("dA", dA[i], ref_A), ("dB", dB[i], ref_B)):
            err = rel_err(got, ref)
            assert err <= TOL[dtype], f"{name}[{i}]: rel err {err:.2e} > {TOL[dtype]:g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "k", "ns", "ranks", "scalings"), [
    (50, 40, [24], [3], [2.0]),  # one linear, everything smaller than a block
    (200, 130, [20, 20, 20], [4, 4, 4], [0.5, 0.5, 0.5]),  # q, k, v: rows over several splits, partial column blocks
    (129, 64, [17, 70], [8, 2], [1.0, 3.0]),  # two linears, unequal ranks and scalings
    (33, 16, [130], [16], [1.5]),  # one rank tile filled exactly, many output columns
    (97, 72, [40, 8, 56], [24, 24, 16], [0.25, 2.0, 1.0]),  # the largest stack of ranks taken (64)
    (21, 4100, [24], [3], [1.0]),  # x wider than ROW_WIDE: the row pass's wide steps, a partial last one
    (70, 40, [4099, 8, 8], [2, 4, 8], [1.0, 0.5, 2.0]),  # a g wider than ROW_WIDE, three linears' row blocks
])
def test_matches_the_formulas(m: int, k: int, ns: list[int], ranks: list[int], scalings: list[float],
                              dtype: torch.dtype) -> None:
    _case(m, k, ns, ranks, scalings, dtype)


def test_outside_its_limits_it_declines() -> None:
    """More than three linears, more than MAX_RANKS ranks in all, an output that never reached the loss, or no
    rows: the caller's cuBLAS path computes those."""
    x = torch.randn(8, 16)
    g = torch.randn(8, 4)
    A = torch.randn(8, 16)
    assert lowrank_grads.supported(x, [g] * 3, [A] * 3)
    assert not lowrank_grads.supported(x, [g] * 4, [A] * 4)
    assert not lowrank_grads.supported(x, [g], [torch.randn(lowrank_grads.MAX_RANKS + 1, 16)])
    assert not lowrank_grads.supported(x, [g, None], [A, A])
    assert not lowrank_grads.supported(x[:0], [g[:0]], [A])  # no rows: nothing to launch over


def test_wide_steps_that_do_not_fit_fall_back_to_narrow_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another Triton may pipeline the row pass's wide steps into more shared memory than the GPU has (its
    launch raises OutOfResources): the narrow steps run instead, to the same gradients."""
    import triton

    real = lowrank_grads._row_pass
    tried = []

    class Tight:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                tried.append((meta["BKX"], meta["BKG"]))
                if lowrank_grads.WIDE_BK in tried[-1]:
                    raise triton.runtime.errors.OutOfResources(240 * 1024, 227 * 1024, "shared memory")
                return real[grid](*args, **meta)
            return launch

    monkeypatch.setattr(lowrank_grads, "_row_pass", Tight())
    _case(21, 4100, [24], [3], [1.0], torch.bfloat16)
    assert tried == [(lowrank_grads.WIDE_BK, lowrank_grads.ROW_BK), (lowrank_grads.ROW_BK, lowrank_grads.ROW_BK)]


def test_finishing_in_the_column_pass_matches_the_finish_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The column pass's last program per column block writes the gradients (`FINISH_IN_COLS`): bitwise what
    the separate `_finish` launch writes (the same sums in the same order), and it leaves every counter at zero
    for the next call, which must come out the same again."""
    m, k, ns, ranks = 200, 130, [20, 70, 8], [4, 2, 8]
    x = torch.randn(m, k).to(torch.bfloat16)
    gs = [torch.randn(m, n).to(torch.bfloat16) for n in ns]
    As = [torch.randn(r, k).to(torch.bfloat16) for r in ranks]
    Bs = [torch.randn(n, r).to(torch.bfloat16) for n, r in zip(ns, ranks, strict=True)]
    lowrank_grads._COUNTERS.clear()
    Bts = [B.t().contiguous() for B in Bs]
    fused = [lowrank_grads.lowrank_grads(x, gs, As, Bts, [0.5, 1.0, 2.0]) for _ in range(2)]
    (counters,) = lowrank_grads._COUNTERS.values()
    assert not counters.any()
    monkeypatch.setattr(lowrank_grads, "FINISH_IN_COLS", False)
    apart = lowrank_grads.lowrank_grads(x, gs, As, Bts, [0.5, 1.0, 2.0])
    for got in fused:
        for a, b in zip(got[0] + got[1], apart[0] + apart[1], strict=True):
            assert torch.equal(a, b)
