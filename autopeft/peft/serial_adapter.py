"""Serial bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

A down-projection to `size`, a non-linearity, an up-projection back, added to its input. It sits on the
output of a sub-layer before the residual add: after the FFN only (Pfeiffer, the cheaper and usually as
good placement) or after both attention and FFN (Houlsby). The up-projection starts at zero: identity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from autopeft import kernels


class Bottleneck(nn.Module):
    """down (h -> m) + bias, activation, up (m -> h) + bias; parameters named for export."""

    def __init__(self, hidden: int, size: int, activation: str, like: torch.Tensor) -> None:
        super().__init__()
        self.hidden, self.size, self.activation = hidden, size, activation
        kw = {"dtype": torch.float32, "device": like.device}
        self.down_weight = nn.Parameter(torch.empty(size, hidden, **kw))
        self.down_bias = nn.Parameter(torch.zeros(size, **kw))
        self.up_weight = nn.Parameter(torch.zeros(hidden, size, **kw))
        self.up_bias = nn.Parameter(torch.zeros(hidden, **kw))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))

    def apply(self, x: torch.Tensor, residual: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        return kernels.bottleneck_adapter(x, self.down_weight, self.down_bias, self.up_weight, self.up_bias,
                                          activation=self.activation, residual=residual, scale=scale)

    def extra_repr(self) -> str:
        return f"{self.hidden} -> {self.size} -> {self.hidden}, {self.activation}"


class SerialAdapter(Bottleneck):
    """Registered as a forward hook on the sub-layer it follows, so the backbone's code stays untouched."""

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # modules that return (hidden, extras)
            return (self.apply(output[0]), *output[1:])
        return self.apply(output)


def bottleneck_param_count(hidden: int, size: int) -> int:
    return 2 * hidden * size + size + hidden
