"""LayerNorms that keep a low-precision backbone's dtype under autocast.

Why: on a GPU the trainer loads the backbone in bf16 and runs it under bf16 autocast, which casts the fp32
trainable parameters (adapters, the head) for their GEMMs. But CUDA autocast runs `layer_norm` in fp32, and in
BERT-family encoders every LayerNorm output is the residual stream: so the whole stream became fp32 between
the frozen bf16 GEMMs. Each linear then cast its input back to bf16 (q, k and v each their own copy), the
residual adds and dropouts ran on fp32, and backward cast every one of those gradients from bf16 to fp32 and
back. In a pack's step at roberta-large size those casts alone took 33.5 of 191.5 ms of device time
(bench/results/packing_step_rowscale-h200-2026-11-30.json). The frozen floor the kernels are measured against
runs the stream in bf16, as does any model loaded in bf16 and run without autocast.

So `keep_norm_dtype` makes each `nn.LayerNorm` of a low-precision model compute in its input's dtype (the
normalisation itself accumulates in fp32 inside PyTorch's kernel either way), with autocast off for that op.
A trained LayerNorm (BitFit, fp32 parameters) is cast to the input's dtype for the op, as autocast casts any
trained weight for its GEMM; its gradient still reaches the fp32 parameters. Llama's RMSNorm already returns
the input's dtype and is left alone.

`FP32_NORMS = True` restores autocast's fp32 LayerNorms, read at each call: the benchmarks set it to measure
both side by side (bench/packing_step.py's grouped_graphed_fp32_norms arm, bench/packing.py --fp32-norms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: autocast's own behaviour (fp32 LayerNorm outputs) instead, for side-by-side measurement
FP32_NORMS = False

LOW_PRECISION = (torch.bfloat16, torch.float16)


class DtypeLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` whose output keeps its input's dtype under autocast (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FP32_NORMS or x.dtype not in LOW_PRECISION:
            return super().forward(x)
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def keep_norm_dtype(model: nn.Module) -> int:
    """Make every plain `nn.LayerNorm` of `model` a `DtypeLayerNorm` in place (same parameters, state-dict keys
    and `isinstance`); returns how many. Idempotent."""
    n = 0
    for module in model.modules():
        if type(module) is nn.LayerNorm:
            module.__class__ = DtypeLayerNorm
            n += 1
    return n


def is_low_precision(dtype: torch.dtype | None) -> bool:
    return dtype in LOW_PRECISION
