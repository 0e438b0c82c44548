"""Bottleneck adapter (serial: residual is x; parallel: a given residual) vs the reference: the Triton kernel and
`accumulate`'s cuBLAS one (fused ReLU epilogue on CUDA, its own backward)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from autopeft.kernels import accumulate
from tests.kernels.compare import act, check_op, param

#: the implementations under test: None is `kernels.bottleneck_adapter` (Triton, as the fixture sets "on")
IMPLS = pytest.mark.parametrize("impl", [None, accumulate.bottleneck_adapter], ids=["triton", "accumulate"])


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
@IMPLS
def test_bottleneck_serial(activation: str, seed: int, impl: Callable | None) -> None:
    H, m = 40, 12
    x = act(3, 13, H, dtype=torch.float32)
    args = [x, param(m, H, scale=H**-0.5), param(m), param(H, m, scale=m**-0.5), param(H)]
    check_op("bottleneck_adapter", args, {"activation": activation}, torch.float32, seed, fn=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@IMPLS
def test_bottleneck_parallel(dtype: torch.dtype, seed: int, impl: Callable | None) -> None:
    H, m = 40, 20
    x = act(3, 13, H, dtype=dtype)
    residual = act(3, 13, H, dtype=dtype)
    args = [x, param(m, H, scale=H**-0.5, like=dtype), param(m, like=dtype), param(H, m, scale=m**-0.5, like=dtype),
            param(H, like=dtype)]
    check_op("bottleneck_adapter", args, {"activation": "gelu", "residual": residual, "scale": 2.5}, dtype, seed,
             fn=impl)


@IMPLS
def test_bottleneck_serial_bf16_scaled(seed: int, impl: Callable | None) -> None:
    H, m, bf16 = 48, 8, torch.bfloat16
    x = act(37, H, dtype=bf16)
    args = [x, param(m, H, scale=H**-0.5, like=bf16), param(m, like=bf16), param(H, m, scale=m**-0.5, like=bf16),
            param(H, like=bf16)]
    check_op("bottleneck_adapter", args, {"activation": "relu", "scale": 0.5}, torch.bfloat16, seed, fn=impl)


def test_bottleneck_rejects_unknown_activation() -> None:
    from autopeft import kernels

    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="activation"):
        kernels.bottleneck_adapter(x, torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8),
                                   activation="swish")
