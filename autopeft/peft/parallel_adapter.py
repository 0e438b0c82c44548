"""Parallel adapters (He et al. 2022, "Towards a unified view of parameter-efficient transfer learning").

A bottleneck reading the FFN block's input and adding `scale` times its output to the FFN block's output,
alongside (not after) the frozen FFN. He et al. found this FFN placement with scale 4 the strongest of the
adapter family. The up-projection starts at zero: identity.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autopeft.peft.serial_adapter import Bottleneck


class ParallelAdapter(Bottleneck):
    """Two hooks: one stores the FFN input, the other adds the adapter to the FFN output.

    When one module is both the FFN's input and output (Llama's `mlp`), `combined_hook` does both at once.
    """

    def __init__(self, hidden: int, size: int, activation: str, scale: float, like: torch.Tensor) -> None:
        super().__init__(hidden, size, activation, like)
        self.scale = scale
        self._x: torch.Tensor | None = None

    def capture_hook(self, module: nn.Module, args: Any) -> None:
        self._x = args[0]

    def add_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        x, self._x = self._x, None
        if x is None:
            raise RuntimeError("parallel adapter: the FFN output ran before its input was seen")
        return self.apply(x, residual=output, scale=self.scale)

    def combined_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return self.apply(args[0], residual=output, scale=self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"
