"""IA3 (Liu et al. 2022): learned element-wise rescaling of activations, initialised to ones.

On k, v, q and ffn_in it rescales the layer's output (HF PEFT's non-feedforward case); on o and ffn_out it
rescales the layer's input (HF PEFT's feedforward case: for ffn_out that is the FFN's inner activation).
"""

from __future__ import annotations

import torch
from torch import nn

#: module types whose input (not output) IA3 rescales
INPUT_SCALED = ("o", "ffn_out")


def ia3_side(module_type: str) -> str:
    return "in" if module_type in INPUT_SCALED else "out"


def init_ia3(features: int, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.ones(features, dtype=torch.float32, device=like.device))


def ia3_param_count(in_features: int, out_features: int, module_type: str) -> int:
    return in_features if ia3_side(module_type) == "in" else out_features
