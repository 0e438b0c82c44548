"""LoRA (Hu et al. 2021): a frozen W plus a trainable low-rank update scaling * B @ A.

B starts at zero so the injected model computes exactly the backbone's function; A gets HF PEFT's
Kaiming-uniform init so that the same seed gives the same starting point as `peft.LoraConfig`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023), which keeps updates stable at high rank."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def init_lora(in_features: int, out_features: int, rank: int, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    a = torch.empty(rank, in_features, dtype=torch.float32, device=like.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as peft's LoraLayer.reset_lora_parameters
    b = torch.zeros(out_features, rank, dtype=torch.float32, device=like.device)
    return nn.Parameter(a), nn.Parameter(b)


def lora_param_count(in_features: int, out_features: int, rank: int) -> int:
    return rank * (in_features + out_features)
