"""`kernels.keyed_dropout`: the Triton kernel (CPU interpreter here) draws exactly the reference's mask, forward
and backward, and the mask of a row depends on its key, site, position and feature only: the same at any
padding and in any batch, which is what lets a packed trial draw its sequential twin's masks."""

from __future__ import annotations

import pytest
import torch

from autopeft.kernels import keyed_dropout as kd


def _keys(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64, device="cpu").to(torch.get_default_device())


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal zeros exactly, values bitwise in fp32; in bf16 to one rounding (the interpreter casts fp32 to bf16
    by truncation, a GPU to nearest)."""
    assert torch.equal(got == 0, want == 0)
    if got.dtype == torch.float32:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7, 33), (3, 2, 4, 40), (6, 17)], ids=["rows-pos-feat", "4d", "rows-feat"])
def test_kernel_equals_the_reference_forward_and_backward(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    keys, p, site = _keys(shape[0]), 0.3, 123456789
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    y = kd.keyed_dropout_triton(x, p, keys, site)
    _same(y, kd.keyed_dropout_reference(x.detach(), p, keys, site))
    g = torch.randn_like(y)
    y.backward(g)
    keep = kd.keep_mask(keys, site, x[0, ..., 0].numel(), shape[-1], p).view(shape)
    _same(x.grad, torch.where(keep, g.float() * (1.0 / (1 - p)), 0.0).to(dtype))
    assert keep.any() and not keep.all()


def test_a_rows_mask_does_not_depend_on_padding_or_batch() -> None:
    """A row keeps the same elements with more positions after it (a pack's wider padding) and beside other
    rows (a pack's other trials)."""
    keys, p, site = _keys(4, 1), 0.5, 7
    x = torch.ones(4, 30, 16)
    wide = kd.keyed_dropout_triton(x, p, keys, site)
    narrow = kd.keyed_dropout_triton(x[:, :11], p, keys, site)
    assert torch.equal(wide[:, :11], narrow)
    alone = kd.keyed_dropout_triton(x[2:3], p, keys[2:3], site)
    assert torch.equal(wide[2:3], alone)


def test_masks_drop_p_and_differ_by_key_and_site() -> None:
    keys, p = _keys(16, 2), 0.1
    x = torch.ones(16, 16, 128)
    a = kd.keyed_dropout_triton(x, p, keys, 1) == 0
    assert abs(a.float().mean().item() - p) < 0.01
    b = kd.keyed_dropout_triton(x, p, keys, 2) == 0
    c = kd.keyed_dropout_triton(x, p, _keys(16, 3), 1) == 0
    for other in (b, c):  # independent masks agree on about p^2 of the dropped places, not on all of them
        assert (a & other).float().mean().item() < 3 * p * p


def test_each_device_takes_its_path() -> None:
    """On a GPU the Triton kernel, elsewhere PyTorch (also under the interpreter): the same elements either way."""
    keys, x = _keys(3, 4), torch.randn(3, 5, 24, requires_grad=True)
    y = kd.keyed_dropout(x, 0.25, keys, 9)
    assert torch.equal(y == 0, kd.keyed_dropout_reference(x.detach(), 0.25, keys, 9) == 0)
    assert ("_Keyed" in type(y.grad_fn).__name__) == x.is_cuda


def test_bad_arguments_are_refused() -> None:
    x = torch.randn(3, 4)
    for fn in (kd.keyed_dropout, kd.keyed_dropout_triton):
        with pytest.raises(ValueError, match="rows but"):
            fn(x, 0.1, _keys(2), 0)
        with pytest.raises(ValueError, match="p must be"):
            fn(x, 1.0, _keys(3), 0)
