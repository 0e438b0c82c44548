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

Where the parameters' gradients are views of one flat buffer laid out as the casts are (`share_gradients`:
a graphed step's static gradients, which it accumulates into), the backward adds the gathered gradients into
that buffer in one kernel and hands autograd none: otherwise autograd casts them back and adds each into its
`.grad`, one kernel per parameter (288 at roberta-large size with LoRA r8 on all linears: 0.41 ms of a
19.5 ms graphed step in the profile of bench/results/kernels_lowrank_direct-h200-2026-11-30.json).

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
from torch.utils.weak import WeakIdKeyDictionary

#: id(parameter) -> its cast for the forward running now (empty outside one)
_casts: dict[int, torch.Tensor] = {}
#: parameter -> (its .grad, the flat buffer that .grad is a view of, the view's offset), from `share_gradients`
_homes: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: parameter -> its place among the parameters `install` was given, so `share_gradients` lays those out first
_order: WeakIdKeyDictionary = WeakIdKeyDictionary()


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


def _padded_size(t: torch.Tensor) -> int:
    return t.numel() + (-t.numel() % ALIGN)


class _CastAll(torch.autograd.Function):
    """N parameters -> their casts, as aligned views of one buffer; backward: the N gradients gathered in one
    buffer of the parameters' dtype (None for a cast no op used, as autograd would give), or, with a `sink`
    (buffer, start) where the parameters' `.grad`s lie in this very layout, added there in one kernel."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, sink: tuple[torch.Tensor, int] | None, *params: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        ctx.shapes = [p.shape for p in params]
        ctx.param_dtype = params[0].dtype
        ctx.sink = sink
        ctx.params = params if sink is not None else ()
        # cat in the parameters' own dtype, then one cast: CUDA's cat copies many same-dtype inputs per kernel,
        # but falls back to a copy per input when it must convert
        parts, sizes = _padded(params)
        flat = torch.cat(parts).to(dtype)
        return tuple(piece[: p.numel()].view(p.shape) for piece, p in zip(flat.split(sizes), params, strict=True))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        used = [i for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if not used:
            return (None, None, *out)
        if ctx.sink is not None and all(_home_of(p) is not None for p in ctx.params):  # still the shared .grads
            like = grads[used[0]]
            full = [g if g is not None else like.new_zeros(shape) for g, shape in zip(grads, ctx.shapes, strict=True)]
            parts, sizes = _padded(full)
            buf, start = ctx.sink
            buf[start:start + sum(sizes)].add_(torch.cat(parts))
            return (None, None, *out)
        parts, sizes = _padded([grads[i] for i in used])
        flat = torch.cat(parts).to(ctx.param_dtype)
        for i, piece in zip(used, flat.split(sizes), strict=True):
            out[i] = piece[: ctx.shapes[i].numel()].view(ctx.shapes[i])
        return (None, None, *out)


def _home_of(p: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(buffer, offset) of p's `.grad` where it is still the view `share_gradients` gave it."""
    home = _homes.get(p)
    return None if home is None or p.grad is not home[0] else (home[1], home[2])


def _sink(params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[torch.Tensor, int]] | None:
    """`params` in the order their gradients lie in one shared buffer, and (buffer, start), where they fill a
    stretch of it exactly as `_CastAll` lays out its casts; else None."""
    homes = [_home_of(p) for p in params]
    if not homes or any(h is None for h in homes) or len({id(h[0]) for h in homes}) != 1:
        return None
    order = sorted(range(len(params)), key=lambda i: homes[i][1])
    start = at = homes[order[0]][1]
    for i in order:
        if homes[i][1] != at:
            return None
        at += _padded_size(params[i])
    return [params[i] for i in order], (homes[0][0], start)


def share_gradients(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero `.grad`s for `params` (all of one dtype and device) as views of one flat buffer, the parameters
    `install` was given first and in its order, each view at an ALIGN-aligned offset: the layout `_CastAll`
    gives their casts, so that its backward adds all their gradients at once. Returns the buffer: zero it
    rather than each `.grad` (one kernel, where `_foreach_zero_` on its views took one each). For gradients
    that stay put across steps (a graphed step's); set to None, the sharing ends and autograd makes them as
    usual."""
    ps = list(params)
    buf = torch.zeros(sum(_padded_size(p) for p in ps), dtype=ps[0].dtype, device=ps[0].device)
    at = 0
    for p in sorted(ps, key=lambda p: _order.get(p, len(_order))):
        p.grad = buf[at:at + p.numel()].view(p.shape)
        _homes[p] = (p.grad, buf, at)
        at += _padded_size(p)
    return buf


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
    sink = _sink(todo)
    if sink is not None:
        todo = sink[0]
    for p, c in zip(todo, _CastAll.apply(dtype, None if sink is None else sink[1], *todo), strict=True):
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
    for p in kept:
        _order[p] = len(_order)

    def pre_hook(module: nn.Module, args: Any) -> None:
        if module is owner():
            begin([p for p in kept if p.requires_grad], target_dtype(module))

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        end()

    model.register_forward_pre_hook(pre_hook)
    model.register_forward_hook(post_hook, always_call=True)
