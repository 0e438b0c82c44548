"""BitFit (Ben Zaken et al. 2022): train only the bias terms, here of the chosen layers.

Adds no module, so it is an identity by construction; it needs a backbone that has biases (BERT-style
encoders do, Llama-style decoders do not).
"""

from __future__ import annotations

from torch import nn

from autopeft.errors import UserError


def bias_parameters(layer: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in layer.named_parameters() if n.endswith("bias") and "autopeft" not in n]


def enable_bitfit(layer: nn.Module, index: int) -> int:
    params = bias_parameters(layer)
    if not params:
        raise UserError(f"bitfit: layer {index} of this backbone has no bias terms (Llama-style models have none); "
                        "drop bitfit from the spec or choose an encoder backbone")
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)
