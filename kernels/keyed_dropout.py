"""Dropout whose mask is a function of where it applies, not of a random stream's position.

Each element keeps or drops by a 32-bit hash of (its row's key, the dropout site, its position, its feature):
    h = mix(mix(mix(key ^ site) + position) + feature * GOLDEN),  kept where (h >> 8) >= round(p * 2^24),
and kept elements are scaled by 1 / (1 - p), as `F.dropout` does. A row's key comes from its trial's seed, the
trial's step and the row's index in the trial's batch (`autopeft.dropout.row_keys`).

Why: a pack trains K trials in one batch (`autopeft.packing`); with `F.dropout` their masks come from one
random stream in another order than K trials run one by one draw them, so a packed trial trained other
models than its sequential twin, and their accuracies moved apart by up to 1.4-1.8 points on SST-2 (MiniLM, H200,
bench/results/packing_graphed_minilm_bf16-h200-2026-11-30.json), where the packing issue allows 0.5. Keyed, a
row draws the same mask alone or in a pack, at any padding (a row's positions and features keep their indices),
and the backward recomputes the mask instead of storing it.

The hash is the same integer arithmetic in PyTorch (`keep_mask`, on int64: each product is masked to 32 bits,
and where it passes 2^63 it wraps as two's complement, which leaves its low 32 bits exact) and in Triton
(`_keyed_dropout`, uint32), so CPU and GPU draw identical masks and the tests compare them bitwise. On a GPU
one Triton kernel applies it forward and backward; elsewhere PyTorch computes the mask and keeps it for the
backward, as `F.dropout` keeps its own.

A module called more than once in one forward (RoBERTa's classification head calls its dropout twice) gets a
new site for each call after the first (`autopeft.dropout.KeyedDropout`), so its masks are independent, as
`F.dropout`'s are.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

#: lowbias32's multipliers (Wellons' integer hash prospector) and 2^32 / phi
MIX1, MIX2, GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9
M32 = 0xFFFFFFFF
#: the most features one program takes (a row's position at a time)
MAX_BLOCK = 1024


def mix32(x: Any) -> Any:
    """The hash's mixer, on a Python int (host-side keys) or an int64 tensor, each value taken mod 2^32."""
    x = x & M32
    x = x ^ (x >> 16)
    x = (x * MIX1) & M32
    x = x ^ (x >> 15)
    x = (x * MIX2) & M32
    return x ^ (x >> 16)


def threshold(p: float) -> int:
    """Elements whose hash's top 24 bits fall below this drop: a fraction p of them."""
    return round(p * (1 << 24))


def keep_mask(keys: torch.Tensor, site: int, positions: int, features: int, p: float) -> torch.Tensor:
    """The reference mask, (rows, positions, features) bool: True where an element is kept."""
    dev = keys.device
    h = mix32(keys.to(torch.int64) ^ site)
    h = mix32(h[:, None] + torch.arange(positions, device=dev))
    f = torch.arange(features, device=dev, dtype=torch.int64) * GOLDEN
    h = mix32(h[:, :, None] + f)
    return (h >> 8) >= threshold(p)


_MIX1: tl.constexpr = tl.constexpr(MIX1)
_MIX2: tl.constexpr = tl.constexpr(MIX2)
_GOLDEN: tl.constexpr = tl.constexpr(GOLDEN)


@triton.jit
def _mix_tl(x):
    """`mix32` on uint32 values."""
    x ^= x >> 16
    x *= tl.full([], _MIX1, tl.uint32)
    x ^= x >> 15
    x *= tl.full([], _MIX2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["site", "thresh"])
def _keyed_dropout(X, Y, KEYS, site, T, H, thresh, scale, BLOCK: tl.constexpr):
    """Y = X * keep / (1 - p) over one (row, position)'s features [BLOCK-block program_id(1)] of (rows, T, H):
    the first two mixes once per program, the last per element (no per-element division)."""
    rt = tl.program_id(0)
    row = rt // T
    h = _mix_tl(tl.load(KEYS + row).to(tl.uint32) ^ site.to(tl.uint32))
    h = _mix_tl(h + (rt % T).to(tl.uint32))
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = f < H
    h = _mix_tl(h + f.to(tl.uint32) * tl.full([], _GOLDEN, tl.uint32))
    keep = (h >> 8) >= thresh.to(tl.uint32)
    offs = rt.to(tl.int64) * H + f
    x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(Y + offs, tl.where(keep, x * scale, 0.0).to(Y.dtype.element_ty), mask=inside)


def _launch(x: torch.Tensor, keys: torch.Tensor, site: int, p: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    h = x.shape[-1]
    if x.numel():
        block = min(MAX_BLOCK, triton.next_power_of_2(h))
        t = x.numel() // (x.shape[0] * h)
        _keyed_dropout[(x.numel() // h, triton.cdiv(h, block))](x, y, keys, site, t, h, threshold(p),
                                                              1.0 / (1.0 - p), BLOCK=block)
    return y


class _Keyed(torch.autograd.Function):
    """Triton forward and backward: the backward applies the same hash to the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keys: torch.Tensor, site: int, p: float) -> torch.Tensor:
        ctx.save_for_backward(keys)
        ctx.site, ctx.p = site, p
        return _launch(x, keys, site, p)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (keys,) = ctx.saved_tensors
        return _launch(g, keys, ctx.site, ctx.p), None, None, None


def keyed_dropout_reference(x: torch.Tensor, p: float, keys: torch.Tensor, site: int) -> torch.Tensor:
    """The PyTorch path: the mask from `keep_mask`, kept by autograd for the backward."""
    rows, h = x.shape[0], x.shape[-1]
    keep = keep_mask(keys, site, x.numel() // max(1, rows * h), h, p).view(x.shape)
    return torch.where(keep, x.float() * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


def _check(x: torch.Tensor, p: float, keys: torch.Tensor) -> None:
    if x.shape[0] != keys.numel():
        raise ValueError(f"keyed dropout: {x.shape[0]} rows but {keys.numel()} keys")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"keyed dropout: p must be in [0, 1), not {p}")


def keyed_dropout_triton(x: torch.Tensor, p: float, keys: torch.Tensor, site: int) -> torch.Tensor:
    """The Triton path alone (a GPU, or CPU tensors under the interpreter): what the kernel tests compare."""
    _check(x, p, keys)
    return _Keyed.apply(x, keys, site, p)


def keyed_dropout(x: torch.Tensor, p: float, keys: torch.Tensor, site: int) -> torch.Tensor:
    """Dropout of x (rows first, features last; anything between is positions) with row i keyed by keys[i]
    (int64, 32-bit values) at `site` (0 <= site < 2^31): Triton on a GPU, PyTorch elsewhere (also under the
    interpreter, whose Triton would make CPU training crawl); both draw the same mask."""
    _check(x, p, keys)
    if x.is_cuda and keys.device == x.device and x.is_floating_point():
        return _Keyed.apply(x, keys, site, p)
    return keyed_dropout_reference(x, p, keys, site)
