"""The per-chunk rescaling kernel (`scale_rows`: IA3's and a pack's rescalings) vs its reference, in fp64."""

from __future__ import annotations

import pytest
import torch

from autopeft import kernels
from autopeft.kernels import reference
from tests.kernels.compare import act, check_op, frozen, param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("layout", ["one", "per_slot", "gathered"])
def test_scale_rows(dtype: torch.dtype, shift: bool, layout: str, seed: int) -> None:
    """Odd sizes (rows and features not multiples of the blocks), trainable scale and shift; chunks that
    gather their slot's row, repeat slots and leave one out (its gradient is zero, not missing)."""
    chunks, slots, idx = {"one": (1, 1, None), "per_slot": (3, 3, None),
                          "gathered": (5, 4, torch.tensor([2, 0, 2, 3, 0]))}[layout]
    y = act(chunks, 37, 150, dtype=dtype)
    scale = (1 + 0.5 * torch.randn(slots, 150)).to(dtype).requires_grad_(True)
    c = (0.5 * torch.randn(slots, 150)).to(dtype).requires_grad_(True) if shift else None
    check_op("scale_rows", [y, scale, c, idx], {}, dtype, seed)


def test_scale_rows_with_a_frozen_scale(seed: int) -> None:
    """Only the input needs a gradient (a frozen scale, as IA3 at evaluation with grad on)."""
    y = act(2, 9, 20, dtype=torch.float32)
    scale = frozen(2, 20, dtype=torch.float32)
    check_op("scale_rows", [y, scale], {}, torch.float32, seed)


def test_scale_rows_of_a_wider_shift_is_the_reference() -> None:
    """An fp32 shift on bf16 rows promotes the result (DoRA's fp32 bias in a pack): the kernel defers to the
    reference rather than round it to bf16."""
    y = torch.randn(2, 5, 8).to(torch.bfloat16)
    scale, shift = torch.randn(2, 8).to(torch.bfloat16), torch.randn(2, 8)
    got = kernels.scale_rows(y, scale, shift)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference.scale_rows(y, scale, shift))


@pytest.mark.parametrize("side", ["out", "in", "both"])
def test_ia3_linear_on_scale_rows(side: str, seed: int) -> None:
    """IA3 as "auto" runs it on CUDA: cuBLAS GEMM, the rescalings through `scale_rows`."""
    from autopeft.kernels import rowscale

    x = act(3, 13, 48, dtype=torch.float32)
    w, b = frozen(40, 48, dtype=torch.float32, scale=48**-0.5), frozen(40, dtype=torch.float32)
    kw = {}
    if side in ("out", "both"):
        kw["scale_out"] = param(40) + 1
    if side in ("in", "both"):
        kw["scale_in"] = param(48) + 1
    kw = {k: v.detach().requires_grad_(True) for k, v in kw.items()}
    check_op("ia3_linear", [x, w, b], kw, torch.float32, seed, fn=rowscale.ia3_linear)


@pytest.mark.parametrize("layout", ["identity", "gather", "unequal"])
@pytest.mark.parametrize("mix", ["all", "mixed"])
def test_packed_linear_on_the_kernel_is_each_trials_own_layer(mix: str, layout: str) -> None:
    """A pack's grouped site with its rescalings (DoRA, IA3 in and out) through the Triton kernel, as it runs on
    a GPU: each trial's rows and gradients are its own PeftLinear's."""
    from tests.test_packing import _assert_same_grads, _layout, packed_site

    slots, state, packed = packed_site(mix)
    assert state.stack() == 1
    state.segments = _layout(layout, len(slots))
    x = torch.randn(state.segments[-1][2], 5, 8, requires_grad=True)
    params = [p for s in slots for p in s.parameters() if p.requires_grad]
    y = packed(x)
    y.square().sum().backward()
    own = torch.cat([slots[k](x[s:e]) for k, s, e in state.segments])
    own_grads = torch.autograd.grad(own.square().sum(), [x, *params], allow_unused=True)
    torch.testing.assert_close(y, own, rtol=1e-5, atol=1e-5)
    _assert_same_grads([x.grad, *(p.grad for p in params)], own_grads, bf16=False)
