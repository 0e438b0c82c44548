"""Plain PyTorch references of every fused op, with the kernels' exact signatures.

They are what runs on CPU and with `--kernels off`, and the ground truth the Triton kernels are tested
against (in fp64). Trainable tensors are kept in fp32 by the trainer; they are cast to the activation dtype
here so bf16 activations never get silently promoted to fp32 GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like.dtype)


def lora_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                scaling: float, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """y = x W^T + b + scaling * dropout(x) A^T B^T, with A (r, in) and B (out, r) as in HF PEFT."""
    y = F.linear(x, _cast(w, x), _cast(b, x))
    xd = F.dropout(x, dropout, training) if dropout and training else x
    return y + scaling * F.linear(F.linear(xd, _cast(A, x)), _cast(B, x))


def lora_linear_multi(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None], As: list[torch.Tensor],
                      Bs: list[torch.Tensor], scalings: list[float]) -> list[torch.Tensor]:
    """Several LoRA linears reading the same input (q, k, v): one `x @ [A_q; A_k; A_v]^T` shared by all."""
    xa = F.linear(x, torch.cat([_cast(a, x) for a in As], 0))
    outs, start = [], 0
    for w, b, a, bb, s in zip(ws, bs, As, Bs, scalings, strict=True):
        r = a.shape[0]
        outs.append(F.linear(x, _cast(w, x), _cast(b, x)) + s * F.linear(xa[..., start:start + r], _cast(bb, x)))
        start += r
    return outs


def dora_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA: (m / ||W + s B A||_row, detached) * (x W^T + s x A^T B^T) + b, as HF PEFT computes it."""
    w_eff = w.to(torch.float32) + scaling * (B.to(torch.float32) @ A.to(torch.float32))
    norm = w_eff.norm(p=2, dim=1).detach()
    scale = (magnitude.to(torch.float32) / norm).to(x.dtype)
    y = F.linear(x, _cast(w, x)) + scaling * F.linear(F.linear(x, _cast(A, x)), _cast(B, x))
    y = y * scale
    return y + _cast(b, x) if b is not None else y


def bottleneck_adapter(x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor,
                       up_b: torch.Tensor, activation: str = "relu", residual: torch.Tensor | None = None,
                       scale: float = 1.0) -> torch.Tensor:
    """(residual if given, else x) + scale * up(act(down(x))): serial adapters add to their input, parallel
    adapters to the frozen block's output."""
    h = ACTIVATIONS[activation](F.linear(x, _cast(down_w, x), _cast(down_b, x)))
    base = x if residual is None else residual
    return base + scale * F.linear(h, _cast(up_w, x), _cast(up_b, x))


def ia3_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale_out: torch.Tensor | None = None,
               scale_in: torch.Tensor | None = None) -> torch.Tensor:
    """IA3: the input (o, ffn_out) or the output (q, k, v, ffn_in) of a frozen linear rescaled per feature."""
    if scale_in is not None:
        x = x * _cast(scale_in, x)
    y = F.linear(x, _cast(w, x), _cast(b, x))
    return y * _cast(scale_out, y) if scale_out is not None else y
