"""One cast per training step of every trainable adapter tensor, instead of one per use.

Why: the trainer keeps adapter parameters in fp32 and the backbone computes in bf16, so every adapter op casts
its parameters on every step, and autograd casts each gradient back: two kernels per parameter per step, each a
few microseconds of almost nothing. On a GPU the step of an encoder is made of such kernels (a graphed
roberta-large-size step with LoRA r8 on all linears ran 3,289 kernels in 24 ms against the frozen floor's 1,011
in 14 ms, bench/results/kernels_attention_mask-h200-2026-11-30.json), and LoRA on all 144 linears has 288
parameters: 576 cast kernels a step. Here one `torch.cat` and one cast make them all at the start of the
forward, and the backward gathers their gradients into one fp32 buffer the same way: `begin` (a forward
pre-hook that `install`, called by `inject`, puts on the model) makes the casts and `cast` (which every adapter
op's parameter cast goes through) hands them out until the forward returns (`end`).

The casts are made inside the forward, so a CUDA graph captured over the step recomputes them from the
updated fp32 parameters at every replay. They exist only while a forward with gradients runs outside
torch.compile (which fuses casts itself); everywhere else `cast` is `t.to(dtype)`, as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: id(parameter) -> its cast for the forward running now (empty outside one)
_casts: dict[int, torch.Tensor] = {}


#: every cast starts ALIGN elements into the buffer after the previous one's start (128 bytes in bf16): a
#: kernel handed a view at an odd offset may assume an aligned pointer. On an H200, SDPA's backward through
#: prefix key/value casts at unaligned offsets gave other gradients than per-use casts; aligned, every
#: gradient is bitwise the per-use one there, eager and graphed (bench/profile/step_casts_check.py)
ALIGN = 64


def _padded(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """The tensors flattened, each followed by zeros up to a multiple of ALIGN; and the padded sizes."""
    pad = torch.zeros(ALIGN, dtype=tensors[0].dtype, device=tensors[0].device)
    parts, sizes = [], []
    for t in tensors:
        n = t.numel()
        extra = -n % ALIGN
        parts.append(t.reshape(-1))
        if extra:
            parts.append(pad[:extra])
        sizes.append(n + extra)
    return parts, sizes


class _CastAll(torch.autograd.Function):
    """N parameters -> their casts, as aligned views of one buffer; backward: the N gradients gathered in one
    buffer of the parameters' dtype (None for a cast no op used, as autograd would give)."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.shapes = [p.shape for p in params]
        ctx.param_dtype = params[0].dtype
        # cat in the parameters' own dtype, then one cast: CUDA's cat copies many same-dtype inputs per kernel,
        # but falls back to a copy per input when it must convert
        parts, sizes = _padded(params)
        flat = torch.cat(parts).to(dtype)
        return tuple(piece[: p.numel()].view(p.shape) for piece, p in zip(flat.split(sizes), params, strict=True))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        used = [i for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if used:
            parts, sizes = _padded([grads[i] for i in used])
            flat = torch.cat(parts).to(ctx.param_dtype)
            for i, piece in zip(used, flat.split(sizes), strict=True):
                out[i] = piece[: ctx.shapes[i].numel()].view(ctx.shapes[i])
        return (None, *out)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`: this step's cast of it where `begin` made one, else `t.to(dtype)`."""
    c = _casts.get(id(t))
    return c if c is not None and c.dtype == dtype else t.to(dtype)


def has_cast(t: torch.Tensor) -> bool:
    return id(t) in _casts


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on x runs in: autocast's, when it is on."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def target_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the adapters compute in: that of a GEMM on the frozen backbone's weights."""
    frozen = next((p for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    return None if frozen is None else compute_dtype(frozen)


def begin(params: Sequence[torch.Tensor], dtype: torch.dtype | None) -> None:
    """Cast `params` (those not already in `dtype`) for the forward about to run; forget any earlier casts.
    Nothing under torch.compile (the global dict is not for dynamo to trace) or without gradients."""
    if torch.compiler.is_compiling():
        return
    _casts.clear()
    if dtype is None or not torch.is_grad_enabled():
        return
    todo = [p for p in params if p.dtype != dtype and p.is_floating_point()]
    if len({(p.dtype, p.device) for p in todo}) != 1:  # none, or mixed: leave them to their own casts
        return
    for p, c in zip(todo, _CastAll.apply(dtype, *todo), strict=True):
        _casts[id(p)] = c


def end() -> None:
    if not torch.compiler.is_compiling():
        _casts.clear()


def install(model: nn.Module, params: Sequence[nn.Parameter]) -> None:
    """Make `model`'s every forward cast `params` once at its start (`begin`) and drop them when it returns or
    raises (`end`): a later forward must not read casts of parameters the optimizer has since moved. A copy of
    `model` (deepcopy copies hooks) casts nothing: its parameters are not these."""
    kept = list(params)
    owner = weakref.ref(model)

    def pre_hook(module: nn.Module, args: Any) -> None:
        if module is owner():
            begin([p for p in kept if p.requires_grad], target_dtype(module))

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        end()

    model.register_forward_pre_hook(pre_hook)
    model.register_forward_hook(post_hook, always_call=True)
