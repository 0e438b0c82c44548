"""Plain PyTorch references of every fused op, with the kernels' exact signatures.

They are what runs on CPU and with `--kernels off`, and the ground truth the Triton kernels are tested
against (in fp64). Trainable tensors are kept in fp32 by the trainer; they are cast to the activation dtype
here so bf16 activations never get silently promoted to fp32 GEMMs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from autopeft.kernels import casts
from autopeft.kernels.casts import compute_dtype  # re-exported: accumulate and packing import it from here

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Cast to the activation dtype, except under autocast, which casts GEMM operands itself: an explicit cast
    there would turn a bf16 frozen weight into fp32 (LayerNorm outputs are fp32 under autocast) and back, two
    full copies of the weight per call. A trainable tensor the step has already cast (`casts`: all of a model's
    adapter parameters in one kernel) comes from there, autocast or not."""
    if t is None:
        return t
    if casts.has_cast(t):
        return casts.cast(t, compute_dtype(like))
    if torch.is_autocast_enabled(like.device.type):
        return t
    return t.to(like.dtype)


def _add_low_rank(y: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y + scaling * xa @ B^T as one GEMM accumulating into a copy of y (cuBLAS beta=1), for any `y`: no
    separate scale and add kernels, forward or backward, which is most of the cost of LoRA at encoder sizes
    (launch-bound). Where `y` is a linear's own fresh output, `_accumulate_low_rank` saves the copy."""
    out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), B.t(), alpha=scaling)
    return out.view(y.shape)


def _accumulate_low_rank(y: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`_add_low_rank` in place: y (M, out) += scaling * xa (M, r) @ B^T, with `y` the fresh 2-D output of a
    linear, which no backward reads. An out-of-place `addmm` first copies all of `y` into its result (on CUDA
    a device-to-device memcpy of the (M, out) activation): on an H200 at Llama-1.1B size that was 4.5 ms of a
    130 ms step, one copy per LoRA linear (bench/results/kernels_llama_profile-h200-2026-11-30.json, "Memcpy
    DtoD"). `y` must not be a view (of a 3-D linear output, say): autograd would then route the in-place
    update through its view machinery (CopySlices, as_strided), which copies in backward instead; so the
    callers run their linears on 2-D inputs and shape the result afterwards. Autocast does not cover in-place
    ops, so the (rank-sized) operands are cast to y's dtype here, as autocast's own `addmm` would."""
    return y.addmm_(xa.to(y.dtype), B.t().to(y.dtype), alpha=scaling)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def lora_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                scaling: float, dropout: float = 0.0, training: bool = False, *,
                dropped: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b + scaling * dropout(x) A^T B^T, with A (r, in) and B (out, r) as in HF PEFT; `dropped`, where
    given, is dropout(x) already drawn (keyed: `autopeft.dropout`)."""
    x2 = _rows(x)
    y = F.linear(x2, _cast(w, x), _cast(b, x))
    if dropped is not None:
        xd = _rows(dropped)
    else:
        xd = F.dropout(x2, dropout, training) if dropout and training else x2
    xa = F.linear(xd, _cast(A, x))
    return _accumulate_low_rank(y, xa, _cast(B, xa), scaling).view(*x.shape[:-1], y.shape[-1])


def lora_linear_multi(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None], As: list[torch.Tensor],
                      Bs: list[torch.Tensor], scalings: list[float]) -> list[torch.Tensor]:
    """Several LoRA linears reading the same input (q, k, v): one `x @ [A_q; A_k; A_v]^T` shared by all.

    The A's are concatenated before the cast (one cast kernel, not one per A) and the shared product is cut
    with `split`, whose backward is a single concatenation of the parts' gradients (slicing would zero-fill
    and copy a full-width buffer per part). Each part then goes through exactly `lora_linear`'s epilogue.
    """
    x2 = _rows(x)
    if all(casts.has_cast(a) for a in As):  # already cast this step: concatenate the casts
        xa = F.linear(x2, torch.cat([_cast(a, x) for a in As], 0))
    else:
        xa = F.linear(x2, _cast(torch.cat(As, 0), x))
    parts = xa.split([a.shape[0] for a in As], -1)
    outs = []
    for w, b, part, bb, s in zip(ws, bs, parts, Bs, scalings, strict=True):
        y = _accumulate_low_rank(F.linear(x2, _cast(w, x), _cast(b, x)), part, _cast(bb, part), s)
        outs.append(y.view(*x.shape[:-1], y.shape[-1]))
    return outs


def dora_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA: (m / ||W + s B A||_row, detached) * (x W^T + s x A^T B^T) + b, as HF PEFT computes it."""
    w_eff = w.to(torch.float32) + scaling * (B.to(torch.float32) @ A.to(torch.float32))
    norm = w_eff.norm(p=2, dim=1).detach()
    scale = (magnitude.to(torch.float32) / norm).to(x.dtype)
    x2 = _rows(x)
    xa = F.linear(x2, _cast(A, x))
    y = _accumulate_low_rank(F.linear(x2, _cast(w, x)), xa, _cast(B, xa), scaling)
    y = (y * scale.to(y.dtype)).view(*x.shape[:-1], y.shape[-1])
    return y + _cast(b, x) if b is not None else y


def bottleneck_adapter(x: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor,
                       up_b: torch.Tensor, activation: str = "relu", residual: torch.Tensor | None = None,
                       scale: float = 1.0) -> torch.Tensor:
    """(residual if given, else x) + scale * up(act(down(x))): serial adapters add to their input, parallel
    adapters to the frozen block's output."""
    h = ACTIVATIONS[activation](F.linear(x, _cast(down_w, x), _cast(down_b, x)))
    base = x if residual is None else residual
    up = F.linear(h, _cast(up_w, x), _cast(up_b, x))
    return base + up if scale == 1.0 else torch.add(base, up, alpha=scale)


def ia3_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale_out: torch.Tensor | None = None,
               scale_in: torch.Tensor | None = None) -> torch.Tensor:
    """IA3: the input (o, ffn_out) or the output (q, k, v, ffn_in) of a frozen linear rescaled per feature."""
    if scale_in is not None:
        x = x * casts.cast(scale_in, x.dtype)
    y = F.linear(x, _cast(w, x), _cast(b, x))
    return y * casts.cast(scale_out, y.dtype) if scale_out is not None else y


def _chunk_rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Per-slot [K, F] -> per-chunk [G, 1, F] (row idx[g] for chunk g, row g without idx)."""
    return (t if idx is None else t.index_select(0, idx)).unsqueeze(1)


def scale_rows(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None,
               idx: torch.Tensor | None = None) -> torch.Tensor:
    """y [G, T, F] * scale[slot] + shift[slot], the slot of chunk g being idx[g] (g without idx), scale and shift
    [K, F]: a per-feature rescaling applied per chunk of rows. IA3 is it with one chunk; a pack of trials
    (`autopeft.packing`) rescales each trial's rows with its own DoRA magnitude and IA3 vectors. One `addcmul`
    where the shift has y's dtype (a shift of a wider dtype promotes the result, as `y * s + c` does)."""
    s = _chunk_rows(scale, idx)
    if shift is None:
        return y * s
    c = _chunk_rows(shift, idx)
    return torch.addcmul(c, y, s) if c.dtype == y.dtype else y * s + c


def grouped_lora_linear(x3: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                        Bt: torch.Tensor, alpha: float, scale_out: torch.Tensor | None = None,
                        shift: torch.Tensor | None = None, scale_in: torch.Tensor | None = None, *,
                        before: Sequence[bool] | None = None, out_slots: Sequence[int] = (),
                        in_slots: Sequence[int] = (), lora_slots: Sequence[int] | None = None) -> torch.Tensor:
    """A pack's linear site, chunk k of rows being trial k's: ((x_k * si_k) W^T + s (x_k * si_k) A_k^T B_k
    [+ b or b_k where before[k]]) * so_k + c_k, the rescalings only for the trials in `in_slots` / `out_slots`;
    Bt [K, r, out] is B transposed; `lora_slots` changes nothing here (the other trials' A and B are zeros).
    Term by term per chunk: what `grouped_fold` computes folded."""
    outs = []
    for k in range(x3.shape[0]):
        xk = x3[k] * scale_in[k] if k in in_slots else x3[k]
        y = xk @ w.t() + alpha * (xk @ A[k].t()) @ Bt[k]
        if bias is not None and (before is None or before[k]):
            y = y + (bias if bias.dim() == 1 else bias[k])
        if k in out_slots:
            y = y * scale_out[k] + (shift[k] if shift is not None else 0)
        outs.append(y)
    return torch.stack(outs)
