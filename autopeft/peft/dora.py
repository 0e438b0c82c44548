"""DoRA (Liu et al. 2024): LoRA whose direction is renormalised and rescaled by a learned magnitude.

The magnitude starts at the row norms of W, so at init (B = 0) the layer is the frozen one exactly. The norm
is detached in the forward pass, as in the paper's section 4.3 and HF PEFT, which saves the memory of
back-propagating through it.
"""

from __future__ import annotations

import torch
from torch import nn


def init_magnitude(weight: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(weight.detach().float().norm(p=2, dim=1))


def dora_param_count(in_features: int, out_features: int, rank: int) -> int:
    return rank * (in_features + out_features) + out_features
