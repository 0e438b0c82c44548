"""Fused LoRA and multi-LoRA vs the reference: output and every gradient, fp32/bf16/fp16, odd sizes, 3D input.
Each op three ways: the Triton kernels, and the update folded into the frozen weight (`kernels.lora_fold`) with A's
and B's gradients by `kernels.lowrank_grads` or by cuBLAS."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from tests.kernels.compare import act, check_op, frozen, param, rel_err

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=["triton", "fold", "fold_cublas_grads"])
def impl(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Any]]:
    """The implementation of an op under test: None for the dispatch on "on" (Triton), or lora_fold's, its A and
    B gradients by `lowrank_grads` (its default) or by cuBLAS GEMMs."""
    if request.param == "triton":
        yield lambda name: None
        return
    from autopeft.kernels import lora_fold

    fused = lora_fold.FUSED_GRADS
    lora_fold.FUSED_GRADS = request.param == "fold"
    yield lambda name: getattr(lora_fold, name)
    lora_fold.FUSED_GRADS = fused


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", ["none", "frozen", "trained"])
def test_lora_linear(dtype: torch.dtype, bias: str, seed: int, impl: Callable[[str], Any]) -> None:
    M1, M2, K, N, r = 3, 13, 48, 40, 4
    x = act(M1, M2, K, dtype=dtype)
    w = frozen(N, K, dtype=dtype, scale=K**-0.5)
    b = None if bias == "none" else frozen(N, dtype=dtype).requires_grad_(bias == "trained")
    A, B = param(r, K, scale=K**-0.5, like=dtype), param(N, r, like=dtype)
    check_op("lora_linear", [x, w, b, A, B, 2.0], {}, dtype, seed, fn=impl("lora_linear"))


def test_lora_linear_fp16_long_rank_and_k(seed: int, impl: Callable[[str], Any]) -> None:
    """K and r spanning several K-loop and rank-loop iterations, with an fp32 frozen weight under fp16 input."""
    K, N, r = 80, 24, 70
    x = act(2, 9, K, dtype=torch.float16)
    w = frozen(N, K, dtype=torch.float32, scale=K**-0.5)
    A, B = param(r, K, scale=K**-0.5, like=torch.float16), param(N, r, scale=r**-0.5, like=torch.float16)
    check_op("lora_linear", [x, w, None, A, B, 0.5], {}, torch.float16, seed, fn=impl("lora_linear"))


def test_lora_linear_input_without_grad(seed: int, impl: Callable[[str], Any]) -> None:
    """The first adapted layer: no input gradient is asked for, A and B still get theirs."""
    x = act(37, 48, dtype=torch.float32, grad=False)
    w = frozen(40, 48, dtype=torch.float32)
    check_op("lora_linear", [x, w, frozen(40, dtype=torch.float32), param(4, 48), param(40, 4), 1.0], {},
             torch.float32, seed, fn=impl("lora_linear"))


def test_lora_linear_dropout(seed: int) -> None:
    """Dropout on the low-rank path only: replays the kernel's mask (one bernoulli_ draw of x's shape)."""
    from autopeft import kernels

    p, s = 0.3, 1.5
    x = act(3, 13, 48, dtype=torch.float32)
    w, b = frozen(40, 48, dtype=torch.float32), frozen(40, dtype=torch.float32)
    A, B = param(4, 48), param(40, 4)
    torch.manual_seed(seed)  # every device's generator: the mask is drawn on x's (set_rng_state is the CPU's)
    y = kernels.lora_linear(x, w, b, A, B, s, dropout=p, training=True)
    torch.manual_seed(seed)
    mask = torch.empty(39, 48).bernoulli_(1 - p).bool().reshape(x.shape)
    xr, Ar, Br = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    yr = xr @ w.double().t() + b.double() + s * ((xr * mask / (1 - p)) @ Ar.t()) @ Br.t()
    assert rel_err(y, yr) <= 1e-4, seed
    g = torch.randn_like(yr)
    grads = torch.autograd.grad((y * g.float()).sum(), [x, A, B])
    ref = torch.autograd.grad((yr * g).sum(), [xr, Ar, Br])
    for name, a, r in zip("xAB", grads, ref):
        assert rel_err(a, r) <= 1e-4, (name, rel_err(a, r), seed)
    assert not torch.equal(y, kernels.lora_linear(x, w, b, A, B, s, dropout=p, training=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scalings", [[2.0, 0.5, 1.0], [1.5, 1.5, 1.5]])
def test_lora_linear_multi(dtype: torch.dtype, scalings: list[float], seed: int, impl: Callable[[str], Any]) -> None:
    """q/k/v of a GQA layer: different output sizes and ranks, one without bias, one with a trained bias; scalings
    that differ, and one shared (the fold then takes the A's gradients in one GEMM)."""
    K = 48
    x = act(3, 13, K, dtype=dtype)
    outs, ranks = [40, 24, 24], [4, 2, 8]
    ws = [frozen(n, K, dtype=dtype, scale=K**-0.5) for n in outs]
    bs = [frozen(40, dtype=dtype), None, frozen(24, dtype=torch.float32).requires_grad_(True)]
    As = [param(r, K, scale=K**-0.5, like=dtype) for r in ranks]
    Bs = [param(n, r, like=dtype) for n, r in zip(outs, ranks)]
    check_op("lora_linear_multi", [x, ws, bs, As, Bs, scalings], {}, dtype, seed, fn=impl("lora_linear_multi"))


def test_lora_linear_multi_unused_output(seed: int, impl: Callable[[str], Any]) -> None:
    """An output that never reaches the loss gets no gradient and breaks nothing."""
    K = 48
    x = act(37, K, dtype=torch.float32)
    ws = [frozen(40, K, dtype=torch.float32) for _ in range(2)]
    As, Bs = [param(4, K) for _ in range(2)], [param(40, 4) for _ in range(2)]
    As[1].requires_grad_(False)
    Bs[1].requires_grad_(False)
    check_op("lora_linear_multi", [x, ws, [None, None], As, Bs, [1.0, 1.0]], {}, torch.float32, seed,
             unused_outputs=(1,), fn=impl("lora_linear_multi"))


def test_folded_lora_with_dropout_is_the_reference(seed: int) -> None:
    """LoRA dropout masks the low-rank path's input only, which no single weight can express: the fold hands a
    training call with dropout to the reference (same RNG draw, same output), and folds it at evaluation."""
    from autopeft.kernels import lora_fold, reference

    x = act(5, 16, dtype=torch.float32)
    w, A, B = frozen(8, 16, dtype=torch.float32), param(2, 16), param(8, 2)
    torch.manual_seed(seed)
    got = lora_fold.lora_linear(x, w, None, A, B, 1.0, dropout=0.5, training=True)
    torch.manual_seed(seed)
    torch.testing.assert_close(got, reference.lora_linear(x, w, None, A, B, 1.0, dropout=0.5, training=True))
    assert not lora_fold.supported(torch.float32, [w], 0.5)
    assert lora_fold.supported(torch.float32, [w], 0.0)
    assert not lora_fold.supported(torch.float32, [w.clone().requires_grad_(True)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_weights_of_unequal_heights_in_one_launch(dtype: torch.dtype, seed: int) -> None:
    """q, k and v folded in one launch (`lora_fold.fold_weights`): heights over several row blocks and under one
    (GQA's k and v), whose surplus blocks return at once; each its own rank and scaling. Each B^T, which the
    backward reads, comes out of the same launch exactly."""
    from autopeft.kernels import lora_fold

    K, heights, ranks, scalings = 40, [150, 20, 70], [4, 2, 8], [2.0, 0.5, 1.0]
    ws = [frozen(n, K, dtype=dtype, scale=K**-0.5) for n in heights]
    As = [param(r, K, scale=K**-0.5).detach().to(dtype) for r in ranks]
    Bs = [param(n, r).detach().to(dtype) for n, r in zip(heights, ranks)]
    bts: list[torch.Tensor] = []
    got = lora_fold.fold_weights(ws, As, Bs, scalings, dtype, tiles=(64, 64, 4), transposed_Bs=bts)
    for bt, B in zip(bts, Bs, strict=True):
        assert bt.is_contiguous() and torch.equal(bt, B.t())
    for g, w, A, B, s in zip(got, ws, As, Bs, scalings):
        ref = w.double() + s * B.double() @ A.double()
        assert g.shape == w.shape and g.dtype == dtype
        assert rel_err(g, ref) <= (1e-2 if dtype == torch.bfloat16 else 1e-5), seed
