"""Prefix-tuning (Li & Liang 2021): trainable key/value vectors prepended to every attention call of a layer.

Two forms. Ungated (`gate: false`) is exactly HF PEFT's prefix-tuning (no reparametrisation MLP): prefix keys
are concatenated in front of the sequence's keys, so its parameter count and export match HF PEFT, but
like HF's it changes the model's output at init. Gated (`gate: true`, our default) attends to the prefix in
a separate softmax whose output is added with a per-head gate that starts at zero (as LLaMA-Adapter does):
the model starts as the backbone exactly, and the search can compare it fairly with methods that do.

Both go through PyTorch SDPA via a registered transformers attention function, so no architecture's
attention code is copied here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autopeft.kernels import casts

ATTN_IMPLEMENTATION = "autopeft"
_registered_names: set[str] = set()  # attention functions registered with transformers in this process


class PrefixKV(nn.Module):
    def __init__(self, length: int, num_kv_heads: int, head_dim: int, num_heads: int, gate: bool,
                 like: torch.Tensor) -> None:
        super().__init__()
        kw = {"dtype": torch.float32, "device": like.device}
        self.length = length
        self.key = nn.Parameter(torch.randn(num_kv_heads, length, head_dim, **kw))
        self.value = nn.Parameter(torch.randn(num_kv_heads, length, head_dim, **kw))
        self.gate = nn.Parameter(torch.zeros(num_heads, **kw)) if gate else None

    def extra_repr(self) -> str:
        return f"length={self.length}, gated={self.gate is not None}"


def prefix_param_count(length: int, num_kv_heads: int, head_dim: int, num_heads: int, gate: bool) -> int:
    return 2 * length * num_kv_heads * head_dim + (num_heads if gate else 0)


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: SDPA, plus the module's prefix where it has one."""
    sdpa = _sdpa()
    prefix: PrefixKV | None = getattr(module, "autopeft_prefix", None)
    if prefix is None:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    batch = query.shape[0]
    pk = casts.cast(prefix.key, key.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
    pv = casts.cast(prefix.value, value.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
    if prefix.gate is not None:
        base, _ = sdpa(module, query, key, value, attention_mask, **kwargs)
        extra, _ = sdpa(module, query, pk, pv, None, **{**kwargs, "is_causal": False})
        return base + extra * casts.cast(prefix.gate, extra.dtype).view(1, 1, -1, 1), None
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", False) if causal is None else causal
    if attention_mask is None and causal and q_len > 1:
        seq = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = seq.view(1, 1, q_len, kv_len)
    if attention_mask is not None:
        visible = attention_mask.new_ones if attention_mask.dtype == torch.bool else attention_mask.new_zeros
        pad = visible((*attention_mask.shape[:-1], prefix.length))
        attention_mask = torch.cat([pad, attention_mask], dim=-1)
    key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
    return sdpa(module, query, key, value, attention_mask, is_causal=False, **kwargs)


def use_attention(model: nn.Module, name: str, fn: Any) -> None:
    """Route the model's attention through `fn`, registered with transformers under `name` once per process
    (masks are built as for SDPA, which `fn` ends in)."""
    if name not in _registered_names:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
        _registered_names.add(name)
    model.set_attn_implementation(name)


def use_prefix_attention(model: nn.Module) -> None:
    """Route the model's attention through `prefix_attention`."""
    use_attention(model, ATTN_IMPLEMENTATION, prefix_attention)
