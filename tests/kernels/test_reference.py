"""The PyTorch references themselves: what they cost beyond their GEMMs (they are what the trainer runs on
"auto"), and that the in-place low-rank update changes no value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from autopeft.kernels import reference


def _full_copies(fn, rows: int, cols: int) -> int:
    """How many aten::copy_ of an entire (rows, cols) activation `fn` runs, forward and backward."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::copy_" and e.input_shapes
               and list(e.input_shapes[0]) == [rows, cols])


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or type(fn).__name__ in seen:
            continue
        seen.add(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions]
    return seen


@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_multi", "dora_linear"])
def test_the_low_rank_update_copies_no_activation(op: str) -> None:
    """An out-of-place addmm copies the whole linear output first (a device memcpy per LoRA linear on CUDA,
    4.5 ms of a Llama-1.1B step on an H200); in place on a view it would go through autograd's as_strided
    machinery instead. Neither may come back: the op copies no more (M, out) activations than the frozen
    linear alone."""
    torch.manual_seed(0)
    B_, T, K, N, r = 2, 7, 16, 12, 4
    x = torch.randn(B_, T, K, requires_grad=True)
    w, b = torch.randn(N, K), torch.randn(N)
    A, Bm = torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True)
    if op == "lora_linear":
        run = lambda: reference.lora_linear(x, w, b, A, Bm, 2.0)
    elif op == "lora_linear_multi":
        run = lambda: reference.lora_linear_multi(x, [w, w], [b, None], [A, A], [Bm, Bm], [2.0, 1.0])[0]
    else:
        m = torch.randn(N, requires_grad=True)
        run = lambda: reference.dora_linear(x, w, b, A, Bm, m, 2.0)
    y = run()
    assert not {"CopySlices", "AsStridedBackward0"} & _graph_names(y)
    # the frozen linear alone is the floor (on CPU its bias is copied into the output before the GEMM)
    g = torch.randn(B_, T, N)  # a contiguous output gradient, as a loss above would send (sum()'s is expanded)
    # DoRA adds its bias after the rescaling: its frozen GEMM has none
    floor_bias = None if op == "dora_linear" else b
    floor = _full_copies(lambda: F.linear(x, w, floor_bias).backward(g), B_ * T, N)
    assert _full_copies(lambda: run().backward(g), B_ * T, N) <= floor


def test_the_in_place_update_equals_the_formula() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(12, 16, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    A = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    Bm = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    got = reference.lora_linear(x, w, b, A, Bm, 0.5)
    want = F.linear(x, w, b) + 0.5 * (x @ A.t()) @ Bm.t()
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, A, Bm), g)
    for a, e in zip(grads, torch.autograd.grad(want, (x, A, Bm), g), strict=True):
        torch.testing.assert_close(a, e)
