"""Fused bottleneck adapter (serial: residual is x; parallel: a given residual) vs the reference."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.compare import act, check_op, param


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_bottleneck_serial(activation: str, seed: int) -> None:
    H, m = 40, 12
    x = act(3, 13, H, dtype=torch.float32)
    args = [x, param(m, H, scale=H**-0.5), param(m), param(H, m, scale=m**-0.5), param(H)]
    check_op("bottleneck_adapter", args, {"activation": activation}, torch.float32, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bottleneck_parallel(dtype: torch.dtype, seed: int) -> None:
    H, m = 40, 20
    x = act(3, 13, H, dtype=dtype)
    residual = act(3, 13, H, dtype=dtype)
    args = [x, param(m, H, scale=H**-0.5, like=dtype), param(m, like=dtype), param(H, m, scale=m**-0.5, like=dtype),
            param(H, like=dtype)]
    check_op("bottleneck_adapter", args, {"activation": "gelu", "residual": residual, "scale": 2.5}, dtype, seed)


def test_bottleneck_serial_bf16_scaled(seed: int) -> None:
    H, m, bf16 = 48, 8, torch.bfloat16
    x = act(37, H, dtype=bf16)
    args = [x, param(m, H, scale=H**-0.5, like=bf16), param(m, like=bf16), param(H, m, scale=m**-0.5, like=bf16),
            param(H, like=bf16)]
    check_op("bottleneck_adapter", args, {"activation": "relu", "scale": 0.5}, torch.bfloat16, seed)


def test_bottleneck_rejects_unknown_activation() -> None:
    from autopeft import kernels

    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="activation"):
        kernels.bottleneck_adapter(x, torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8),
                                   activation="swish")
