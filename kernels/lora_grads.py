"""The per-linear part of the backward of LoRA linears sharing one input, common to both hand-written backwards
(`lora`'s on the Triton GEMM, `accumulate`'s on the library's GEMMs): they differ only in how they form the
input gradient from the pieces returned here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from autopeft.kernels.reference import _rows

#: per linear: (A's dtype, B's dtype, its bias's dtype or None)
Dtypes = Sequence[tuple[torch.dtype, torch.dtype, torch.dtype | None]]


def lora_multi_grads(grads: Sequence[torch.Tensor | None], needs: Sequence[bool], x2: torch.Tensor,
                     xa: torch.Tensor, a_cat: torch.Tensor, ws: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                     ranks: Sequence[int], scalings: Sequence[float], dtypes: Dtypes) -> tuple[list[Any], ...]:
    """For n linears y_i = x W_i^T + b_i + (x (s_i A_i)^T) B_i^T on x2 (M, in), with xa = x2 a_cat^T (M, sum r) and
    `needs` the autograd Function's needs_input_grad over (x, n, ws, bs, As, Bs, scalings):

    returns the bias, A and B gradients (None where not needed or the output never reached the loss) and, for the
    linears whose output did, the pieces of the input gradient: (g_i, W_i) of each frozen GEMM, g_i B_i (M, r_i)
    and the rows of a_cat (s_i A_i) of each low-rank term."""
    n = len(ws)
    gbias: list[torch.Tensor | None] = [None] * n
    gA: list[torch.Tensor | None] = [None] * n
    gB: list[torch.Tensor | None] = [None] * n
    terms, low, rows = [], [], []
    start = 0
    for i in range(n):
        r = ranks[i]
        if grads[i] is None:  # an output that did not reach the loss
            start += r
            continue
        g = _rows(grads[i]).to(x2.dtype)
        gb = g @ Bs[i].to(g.dtype)  # (M, r)
        a_dtype, b_dtype, bias_dtype = dtypes[i]
        if needs[2 + n + i] and bias_dtype is not None:  # BitFit trains the base bias alongside LoRA
            gbias[i] = g.sum(0, dtype=torch.float32).to(bias_dtype)
        if needs[2 + 2 * n + i]:
            gA[i] = (scalings[i] * (gb.t() @ x2)).to(a_dtype)
        if needs[2 + 3 * n + i]:
            gB[i] = (g.t() @ xa[:, start:start + r]).to(b_dtype)
        terms.append((g, ws[i]))
        low.append(gb)
        rows.append(a_cat[start:start + r])
        start += r
    return gbias, gA, gB, terms, low, rows
