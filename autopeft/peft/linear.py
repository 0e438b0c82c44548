"""One wrapper per adapted nn.Linear, holding whichever of LoRA / DoRA / IA3 the spec put there.

A single wrapper (rather than wrappers stacked per method) keeps parameter names stable for export and lets
the common cases go through one fused kernel call (`autopeft.kernels`): LoRA alone, DoRA alone, IA3 alone.
"""

from __future__ import annotations

import torch
from torch import nn

from autopeft import kernels
from autopeft.errors import UserError
from autopeft.peft.dora import init_magnitude
from autopeft.peft.ia3 import ia3_side, init_ia3
from autopeft.peft.lora import init_lora, lora_scaling


class PeftLinear(nn.Module):
    def __init__(self, base: nn.Linear, module_type: str, *, rank: int = 0, alpha: float = 0.0,
                 dropout: float = 0.0, rslora: bool = False, dora: bool = False, ia3: bool = False) -> None:
        super().__init__()
        self.base_layer = base
        self.module_type = module_type
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.dropout = dropout
        self.scaling = lora_scaling(rank, alpha, rslora) if rank else 0.0
        self.dora = bool(dora and rank)
        self.ia3 = ia3_side(module_type) if ia3 else None
        if self.dora and dropout:
            raise UserError("DoRA with lora dropout > 0 is not supported; set lora.dropout: 0 for DoRA")
        w = base.weight
        if rank:
            self.autopeft_lora_A, self.autopeft_lora_B = init_lora(self.in_features, self.out_features, rank, w)
        if self.dora:
            self.autopeft_dora_magnitude = init_magnitude(w)
        if self.ia3:
            self.autopeft_ia3 = init_ia3(self.in_features if self.ia3 == "in" else self.out_features, w)

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `module.weight` (e.g. dtype checks) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.base_layer.weight, self.base_layer.bias
        scale_in = self.autopeft_ia3 if self.ia3 == "in" else None
        scale_out = self.autopeft_ia3 if self.ia3 == "out" else None
        if not self.rank:
            return kernels.ia3_linear(x, w, b, scale_out=scale_out, scale_in=scale_in)
        if scale_in is not None:
            x = x * scale_in.to(x.dtype)
        if self.dora:
            y = kernels.dora_linear(x, w, b, self.autopeft_lora_A, self.autopeft_lora_B,
                                    self.autopeft_dora_magnitude, self.scaling)
        else:
            y = kernels.lora_linear(x, w, b, self.autopeft_lora_A, self.autopeft_lora_B, self.scaling,
                                    dropout=self.dropout, training=self.training)
        return y * scale_out.to(y.dtype) if scale_out is not None else y

    def merged_weight(self) -> torch.Tensor:
        """W with the update folded in (what an exported, merged model would hold); IA3 not included."""
        w = self.base_layer.weight.float()
        if not self.rank:
            return w
        w = w + self.scaling * self.autopeft_lora_B.float() @ self.autopeft_lora_A.float()
        if self.dora:
            w = w * (self.autopeft_dora_magnitude.float() / w.norm(dim=1)).unsqueeze(1)
        return w

    def extra_repr(self) -> str:
        parts = [f"{self.module_type}"]
        if self.rank:
            parts.append(f"{'dora' if self.dora else 'lora'} r={self.rank} scaling={self.scaling:g}")
        if self.ia3:
            parts.append(f"ia3 ({self.ia3})")
        return ", ".join(parts)
