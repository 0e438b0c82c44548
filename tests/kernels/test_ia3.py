"""Fused IA3 (input scale in the GEMM prologue, output scale in its epilogue) vs the reference."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.compare import act, check_op, frozen, param


def _scale(n: int, like: torch.dtype = torch.float32) -> torch.Tensor:
    return (1 + 0.5 * torch.randn(n)).to(like).float().requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["out", "in", "both"])
def test_ia3_linear(dtype: torch.dtype, side: str, seed: int) -> None:
    K, N = 48, 40
    x = act(3, 13, K, dtype=dtype)
    w, b = frozen(N, K, dtype=dtype, scale=K**-0.5), frozen(N, dtype=dtype)
    kw = {}
    if side in ("out", "both"):
        kw["scale_out"] = _scale(N, dtype)
    if side in ("in", "both"):
        kw["scale_in"] = _scale(K, dtype)
    check_op("ia3_linear", [x, w, b], kw, dtype, seed)


def test_ia3_linear_trained_bias_no_input_grad(seed: int) -> None:
    """IA3 with BitFit on the first layer: bias and scale gradients, no input gradient."""
    x = act(37, 48, dtype=torch.float32, grad=False)
    w = frozen(40, 48, dtype=torch.float32)
    check_op("ia3_linear", [x, w, param(40)], {"scale_out": _scale(40)}, torch.float32, seed)
