"""`kernels.accumulate`: LoRA on the library's GEMMs with its own backward, against the fp64 reference, and the
one thing it exists for: no separate add of the input-gradient terms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from autopeft import kernels
from autopeft.kernels import accumulate, reference
from tests.kernels.compare import DEVICE, act, check_op, cpu_only, frozen, param, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", ["none", "frozen", "trained"])
def test_lora_linear_matches_the_reference(dtype: torch.dtype, bias: str, seed: int) -> None:
    K, N, r = 48, 40, 4
    x = act(3, 13, K, dtype=dtype)
    w = frozen(N, K, dtype=dtype, scale=K**-0.5)
    b = None if bias == "none" else frozen(N, dtype=dtype).requires_grad_(bias == "trained")
    A, B = param(r, K, scale=K**-0.5, like=dtype), param(N, r, like=dtype)
    check_op("lora_linear", [x, w, b, A, B, 2.0], {}, dtype, seed, fn=accumulate.lora_linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_input_linears_match_the_reference(dtype: torch.dtype, seed: int) -> None:
    """q/k/v-like: other widths and ranks, one bias trained, one output left out of the loss."""
    K = 48
    x = act(2, 11, K, dtype=dtype)
    ws = [frozen(n, K, dtype=dtype, scale=K**-0.5) for n in (40, 24, 24)]
    bs = [frozen(40, dtype=dtype), None, frozen(24, dtype=dtype).requires_grad_(True)]
    As = [param(r, K, scale=K**-0.5, like=dtype) for r in (4, 2, 8)]
    Bs = [param(n, r, like=dtype) for n, r in ((40, 4), (24, 2), (24, 8))]
    args = [x, ws, bs, As, Bs, [2.0, 1.0, 0.5]]
    check_op("lora_linear_multi", args, {}, dtype, seed, fn=accumulate.lora_linear_multi)
    # an output that never reaches the loss gets no gradient and breaks nothing (as the Triton op)
    As[1].requires_grad_(False)
    Bs[1].requires_grad_(False)
    check_op("lora_linear_multi", args, {}, dtype, seed, unused_outputs=(1,), fn=accumulate.lora_linear_multi)


def test_under_autocast_it_computes_what_the_reference_does() -> None:
    """The trainer's GPU setting: fp32 activations and weights, bf16 autocast."""
    torch.manual_seed(0)
    x = torch.randn(4, 9, 32, requires_grad=True)
    w, b = torch.randn(24, 32) * 32**-0.5, torch.randn(24)
    A, B = torch.randn(4, 32, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    outs, grads = [], []
    for fn in (reference.lora_linear, accumulate.lora_linear):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = fn(x, w, b, A, B, 2.0)
        outs.append(y)
        grads.append(torch.autograd.grad(y.float().square().sum(), (x, A, B)))
    assert outs[1].dtype == outs[0].dtype == torch.bfloat16
    assert rel_err(outs[1], outs[0]) < 1e-2
    for got, want in zip(grads[1], grads[0], strict=True):
        assert got.dtype == want.dtype and rel_err(got, want) < 2e-2


def _full_size_ops(fn, names: tuple[str, ...], rows: int, cols: int) -> int:
    """Calls of the aten ops `names` over a whole (rows, cols) tensor that `fn` runs (forward and backward)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in names and e.input_shapes and e.input_shapes[0]
               and torch.Size(e.input_shapes[0]).numel() == rows * cols)


def _adds(fn, rows: int, cols: int) -> int:
    return _full_size_ops(fn, ("aten::add", "aten::add_"), rows, cols)


def test_the_input_gradient_terms_are_summed_in_the_gemm_not_added_after() -> None:
    """Three linears on one input (q, k, v): autograd of the frozen linears alone adds their three input
    gradients (2 adds); the reference's LoRA adds its low-rank term on top (3); this module adds none."""
    torch.manual_seed(0)
    M, K = 14, 16
    x = torch.randn(2, 7, K, requires_grad=True)
    ws = [torch.randn(n, K) for n in (12, 8, 8)]
    As = [torch.randn(4, K, requires_grad=True) for _ in ws]
    Bs = [torch.randn(w.shape[0], 4, requires_grad=True) for w in ws]

    def run(op):
        def step():
            ys = op(x, ws, [None] * 3, As, Bs, [1.0] * 3)
            torch.autograd.grad(ys, [x, *As, *Bs], [torch.randn_like(y) for y in ys])
        return step

    floor = _adds(lambda: torch.autograd.grad([F.linear(x, w) for w in ws], x,
                                              [torch.randn(2, 7, w.shape[0]) for w in ws]), M, K)
    assert floor == 2
    assert _adds(run(reference.lora_linear_multi), M, K) == 3
    assert _adds(run(accumulate.lora_linear_multi), M, K) == 0


@cpu_only
def test_mode_accumulate_routes_lora_there_and_auto_keeps_the_reference_on_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(accumulate, "lora_linear", lambda *a, **k: calls.append(a) or reference.lora_linear(*a, **k))
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    for mode, expected in (("accumulate", 1), ("auto", 1), ("off", 1)):
        kernels.set_kernels(mode)
        kernels.lora_linear(x, w, None, A, B, 1.0)
        assert len(calls) == expected, mode
    kernels.set_kernels("accumulate")
    kernels.ia3_linear(x, w, None)  # not an accumulate op: the reference
    assert len(calls) == 1


def test_a_trained_base_weight_or_dropout_goes_to_the_reference() -> None:
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    y = accumulate.lora_linear(x, w, None, A, B, 1.0)
    y.sum().backward()
    assert w.grad is not None  # the reference's plain autograd trains it
    torch.manual_seed(3)
    got = accumulate.lora_linear(x, w.detach(), None, A, B, 1.0, dropout=0.5, training=True)
    torch.manual_seed(3)
    want = reference.lora_linear(x, w.detach(), None, A, B, 1.0, dropout=0.5, training=True)
    torch.testing.assert_close(got, want)


def test_adapter_under_autocast_computes_what_the_reference_does() -> None:
    """The trainer's GPU setting for an fp32 model: bf16 autocast, a parallel adapter's fp32 residual."""
    torch.manual_seed(0)
    x, res = torch.randn(4, 9, 32, requires_grad=True), torch.randn(4, 9, 32, requires_grad=True)
    ps = [torch.randn(8, 32) * 32**-0.5, torch.randn(8), torch.randn(32, 8) * 8**-0.5, torch.randn(32)]
    ps = [p.requires_grad_(True) for p in ps]
    outs, grads = [], []
    for fn in (reference.bottleneck_adapter, accumulate.bottleneck_adapter):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = fn(x, *ps, activation="relu", residual=res, scale=2.0)
        outs.append(y)
        grads.append(torch.autograd.grad(y.float().square().sum(), (x, res, *ps)))
    assert outs[1].dtype == outs[0].dtype
    assert rel_err(outs[1], outs[0]) < 1e-2
    for got, want in zip(grads[1], grads[0], strict=True):
        assert got.dtype == want.dtype and rel_err(got, want) < 2e-2


def test_an_adapter_scale_is_applied_to_rank_sized_tensors_only() -> None:
    """A scaled adapter (parallel adapters' s): the reference's backward multiplies the hidden-sized output
    gradient by s; here only rank-sized tensors are (the forward's scaled add is one kernel either way)."""
    torch.manual_seed(0)
    H, m = 32, 4
    x = torch.randn(2, 7, H, requires_grad=True)
    ps = [p.requires_grad_(True) for p in (torch.randn(m, H), torch.randn(m), torch.randn(H, m), torch.randn(H))]

    def run(op):
        def step():
            y = op(x, *ps, activation="relu", scale=0.5)
            torch.autograd.grad(y, [x, *ps], torch.randn_like(y))
        return step

    assert _full_size_ops(run(reference.bottleneck_adapter), ("aten::mul", "aten::mul_"), 14, H) > 0
    assert _full_size_ops(run(accumulate.bottleneck_adapter), ("aten::mul", "aten::mul_"), 14, H) == 0


def test_bias_gradients_of_growing_batches_sum_right_and_keep_every_ones_row(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    """`_colsum` reuses one ones row per device and dtype; a longer batch replaces it, and the replaced row must
    stay alive: a CUDA graph captured with it reads it at every replay (freed, its memory would be another
    tensor's and the graph's bias gradients garbage: the GPU test of graphed against eager steps caught that)."""
    monkeypatch.setattr(accumulate, "_ONES", {})
    monkeypatch.setattr(accumulate, "_RETIRED", [])
    rows = []
    for m in (3, 10, 5, 40):
        g = torch.randn(m, 6)
        torch.testing.assert_close(accumulate._colsum(g), g.sum(0))
        rows.append(accumulate._ONES[(g.device, g.dtype)])
    assert [r.shape[1] for r in rows] == [3, 10, 10, 40] and rows[1] is rows[2]  # grows at least 2x, else kept
    assert [id(r) for r in accumulate._RETIRED] == [id(rows[0]), id(rows[1])]
