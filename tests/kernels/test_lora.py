"""Fused LoRA and multi-LoRA vs the reference: output and every gradient, fp32/bf16/fp16, odd sizes, 3D input."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.compare import act, check_op, frozen, param, rel_err

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", ["none", "frozen", "trained"])
def test_lora_linear(dtype: torch.dtype, bias: str, seed: int) -> None:
    M1, M2, K, N, r = 3, 13, 48, 40, 4
    x = act(M1, M2, K, dtype=dtype)
    w = frozen(N, K, dtype=dtype, scale=K**-0.5)
    b = None if bias == "none" else frozen(N, dtype=dtype).requires_grad_(bias == "trained")
    A, B = param(r, K, scale=K**-0.5, like=dtype), param(N, r, like=dtype)
    check_op("lora_linear", [x, w, b, A, B, 2.0], {}, dtype, seed)


def test_lora_linear_fp16_long_rank_and_k(seed: int) -> None:
    """K and r spanning several K-loop and rank-loop iterations, with an fp32 frozen weight under fp16 input."""
    K, N, r = 80, 24, 70
    x = act(2, 9, K, dtype=torch.float16)
    w = frozen(N, K, dtype=torch.float32, scale=K**-0.5)
    A, B = param(r, K, scale=K**-0.5, like=torch.float16), param(N, r, scale=r**-0.5, like=torch.float16)
    check_op("lora_linear", [x, w, None, A, B, 0.5], {}, torch.float16, seed)


def test_lora_linear_input_without_grad(seed: int) -> None:
    """The first adapted layer: no input gradient is asked for, A and B still get theirs."""
    x = act(37, 48, dtype=torch.float32, grad=False)
    w = frozen(40, 48, dtype=torch.float32)
    check_op("lora_linear", [x, w, frozen(40, dtype=torch.float32), param(4, 48), param(40, 4), 1.0], {},
             torch.float32, seed)


def test_lora_linear_dropout(seed: int) -> None:
    """Dropout on the low-rank path only: replays the kernel's mask (one bernoulli_ draw of x's shape)."""
    from autopeft import kernels

    p, s = 0.3, 1.5
    x = act(3, 13, 48, dtype=torch.float32)
    w, b = frozen(40, 48, dtype=torch.float32), frozen(40, dtype=torch.float32)
    A, B = param(4, 48), param(40, 4)
    state = torch.get_rng_state()
    y = kernels.lora_linear(x, w, b, A, B, s, dropout=p, training=True)
    torch.set_rng_state(state)
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
def test_lora_linear_multi(dtype: torch.dtype, seed: int) -> None:
    """q/k/v of a GQA layer: different output sizes and ranks, one without bias, one with a trained bias."""
    K = 48
    x = act(3, 13, K, dtype=dtype)
    outs, ranks = [40, 24, 24], [4, 2, 8]
    ws = [frozen(n, K, dtype=dtype, scale=K**-0.5) for n in outs]
    bs = [frozen(40, dtype=dtype), None, frozen(24, dtype=torch.float32).requires_grad_(True)]
    As = [param(r, K, scale=K**-0.5, like=dtype) for r in ranks]
    Bs = [param(n, r, like=dtype) for n, r in zip(outs, ranks)]
    check_op("lora_linear_multi", [x, ws, bs, As, Bs, [2.0, 0.5, 1.0]], {}, dtype, seed)


def test_lora_linear_multi_unused_output(seed: int) -> None:
    """An output that never reaches the loss gets no gradient and breaks nothing."""
    K = 48
    x = act(37, K, dtype=torch.float32)
    ws = [frozen(40, K, dtype=torch.float32) for _ in range(2)]
    As, Bs = [param(4, K) for _ in range(2)], [param(40, 4) for _ in range(2)]
    As[1].requires_grad_(False)
    Bs[1].requires_grad_(False)
    check_op("lora_linear_multi", [x, ws, [None, None], As, Bs, [1.0, 1.0]], {}, torch.float32, seed,
             unused_outputs=(1,))
