"""Fused DoRA (row norm kernel + magnitude in the epilogue) vs the reference, every gradient."""

from __future__ import annotations

import pytest
import torch

from autopeft.kernels import gemm
from tests.kernels.compare import act, check_op, frozen, param, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_dora_linear(dtype: torch.dtype, bias: bool, seed: int) -> None:
    K, N, r = 48, 40, 4
    x = act(3, 13, K, dtype=dtype)
    w = frozen(N, K, dtype=dtype, scale=K**-0.5)
    b = frozen(N, dtype=dtype) if bias else None
    A, B = param(r, K, scale=K**-0.5, like=dtype), param(N, r, scale=0.3, like=dtype)
    m = (w.float().norm(dim=1) * (1 + 0.2 * torch.randn(N))).to(dtype).float().requires_grad_(True)
    check_op("dora_linear", [x, w, b, A, B, m, 2.0], {}, dtype, seed)


def test_row_norm_kernel(seed: int) -> None:
    """||W + s B A|| per row, over several K blocks and rank blocks, against fp64."""
    w, B, A = torch.randn(45, 100), torch.randn(45, 70), torch.randn(70, 100)
    got = gemm.lowrank_row_norm(w, B, A, 0.25)
    want = (w.double() + 0.25 * B.double() @ A.double()).norm(dim=1)
    assert rel_err(got, want) <= 1e-5, seed
