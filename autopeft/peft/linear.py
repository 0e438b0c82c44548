"""One wrapper per adapted nn.Linear, holding whichever of LoRA / DoRA / IA3 the spec put there.

A single wrapper (rather than wrappers stacked per method) keeps parameter names stable for export and lets
the common cases go through one fused kernel call (`autopeft.kernels`): LoRA alone, DoRA alone, IA3 alone.

LoRA linears that the backbone calls on one input tensor (q/k/v, Llama's gate/up) can be tied into a
`SharedInputLora` group: the first one called computes every member's output with one `x @ [A_1; ...]^T`
(`kernels.lora_linear_multi`) and the others pick theirs up. Fewer, larger GEMMs and one cast of the A's
instead of one per linear: at encoder sizes a step is launch-bound, so every launch saved per layer counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import autopeft.dropout as keyed
from autopeft import kernels
from autopeft.errors import UserError
from autopeft.kernels import casts, reference
from autopeft.peft.dora import init_magnitude
from autopeft.peft.ia3 import ia3_side, init_ia3
from autopeft.peft.lora import init_lora, lora_scaling


class PeftLinear(nn.Module):
    def __init__(self, base: nn.Linear, module_type: str, *, rank: int = 0, alpha: float = 0.0,
                 dropout: float = 0.0, rslora: bool = False, dora: bool = False, ia3: bool = False,
                 dropout_site: int = 0) -> None:
        super().__init__()
        self.base_layer = base
        self.module_type = module_type
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.dropout = dropout
        self.dropout_site = dropout_site  # LoRA dropout's key (`autopeft.dropout`): the linear's place
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
        self.lora_group: SharedInputLora | None = None  # set by `share_lora_input`
        self.lora_group_slot = 0

    @property
    def can_share_input(self) -> bool:
        """Plain LoRA on the unscaled input, without dropout: exactly what `lora_linear_multi` computes. DoRA
        rescales per output row, IA3 on the input changes what the A sees, and dropout draws one mask per
        linear (as HF PEFT), which a shared product cannot reproduce."""
        return bool(self.rank) and not self.dora and self.ia3 != "in" and not self.dropout

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
            x = x * casts.cast(scale_in, x.dtype)
        if self.dora:
            y = kernels.dora_linear(x, w, b, self.autopeft_lora_A, self.autopeft_lora_B,
                                    self.autopeft_dora_magnitude, self.scaling)
        elif self.lora_group is not None:
            y = self.lora_group.output(self.lora_group_slot, x)
        elif self.dropout and self.training and keyed.keyed_for(x):  # as a pack draws it: `autopeft.dropout`
            y = reference.lora_linear(x, w, b, self.autopeft_lora_A, self.autopeft_lora_B, self.scaling,
                                      dropped=keyed.apply(x, self.dropout, self.dropout_site, True))
        else:
            y = kernels.lora_linear(x, w, b, self.autopeft_lora_A, self.autopeft_lora_B, self.scaling,
                                    dropout=self.dropout, training=self.training)
        return y * casts.cast(scale_out, y.dtype) if scale_out is not None else y

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
        if self.lora_group is not None:
            parts.append(f"x A^T shared by {len(self.lora_group.members)}")
        return ", ".join(parts)


class SharedInputLora:
    """LoRA linears of one layer that the backbone calls on the same input tensor, one after the other.

    Whichever member is called first (the "leader") computes every member's output in one
    `kernels.lora_linear_multi` call and keeps the others' until they are asked for. A member takes a kept
    output only when it is called on that very tensor object, unchanged since (its autograd version counter,
    checked in eager mode; dynamo cannot guard on it, and a traced forward runs the backbone's code as is):
    so sharing never changes a result, it only saves work. Any other call (a different input, a member
    called twice) computes afresh. Once every kept output has been taken the input is released, so nothing
    outlives the forward pass.

    A plain object, not an nn.Module: the members are registered where they sit in the backbone, and this
    only refers to them.
    """

    def __init__(self, members: Sequence[PeftLinear]) -> None:
        if len(members) < 2 or not all(m.can_share_input for m in members):
            raise ValueError("SharedInputLora needs two or more plain LoRA linears (no DoRA, input IA3, dropout)")
        if len({m.in_features for m in members}) != 1:
            raise ValueError("SharedInputLora members must read inputs of one width")
        self.members = tuple(members)
        self._x: torch.Tensor | None = None
        self._version = 0
        self._outs: list[torch.Tensor | None] = []

    def output(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Member `slot`'s LoRA output (before any IA3 output scale) for input `x`."""
        version = self._version_of(x)
        outs = self._outs
        if x is self._x and outs[slot] is not None and version == self._version:
            y, outs[slot] = outs[slot], None
            if all(o is None for o in outs):
                self._x, self._outs = None, []
            return y
        ms = self.members
        if version is None:  # an inference tensor has no version counter: nothing could prove it unchanged
            m = ms[slot]
            return kernels.lora_linear(x, m.base_layer.weight, m.base_layer.bias, m.autopeft_lora_A,
                                       m.autopeft_lora_B, m.scaling)
        ys = kernels.lora_linear_multi(x, [m.base_layer.weight for m in ms], [m.base_layer.bias for m in ms],
                                       [m.autopeft_lora_A for m in ms], [m.autopeft_lora_B for m in ms],
                                       [m.scaling for m in ms])
        y = ys[slot]
        ys[slot] = None
        self._x, self._outs, self._version = x, ys, version
        return y

    @staticmethod
    def _version_of(x: torch.Tensor) -> int | None:
        """x's in-place-modification counter; 0 while dynamo traces (it cannot guard on the counter, and the
        traced graph is the backbone's code, which calls the members back to back on one tensor)."""
        if torch.compiler.is_compiling():
            return 0
        return None if x.is_inference() else x._version

    def clear(self) -> None:
        """Drop kept outputs (a forward pass that stopped half-way through a layer leaves some)."""
        self._x, self._outs = None, []


def share_lora_input(layer: nn.Module, groups: Sequence[Sequence[str]]) -> int:
    """Tie the LoRA linears at each tuple of `groups` (paths in `layer` that the backbone calls on one input
    tensor) into a `SharedInputLora`, where two or more of them qualify; returns how many linears were tied."""
    tied = 0
    for paths in groups:
        members = []
        for path in paths:
            m = layer.get_submodule(path)
            if isinstance(m, PeftLinear) and m.can_share_input and m.lora_group is None:
                members.append(m)
        if len(members) < 2:
            continue
        group = SharedInputLora(members)
        for i, m in enumerate(members):
            m.lora_group, m.lora_group_slot = group, i
        tied += len(members)
    return tied
