"""Triton implementations of the six `autopeft.kernels` ops, same signatures as `reference`.

Imported only when a Triton path is taken, so CPU-only installs never import triton. The ops live in
`lora`, `bottleneck` and `ia3`, all on the one fused GEMM of `gemm`, and `scale_rows` (elementwise).
"""

from autopeft.kernels.bottleneck import bottleneck_adapter
from autopeft.kernels.ia3 import ia3_linear
from autopeft.kernels.lora import dora_linear, lora_linear, lora_linear_multi
from autopeft.kernels.rowscale import scale_rows

__all__ = ["bottleneck_adapter", "dora_linear", "ia3_linear", "lora_linear", "lora_linear_multi", "scale_rows"]
