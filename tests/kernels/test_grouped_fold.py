"""A pack's folded linear site (`grouped_fold`: each trial's LoRA in a weight of its own, only the rescaled
trials' rows rescaled) vs its reference, term by term per chunk, in fp64: output and every gradient."""

from __future__ import annotations

import pytest
import torch

from autopeft.kernels import grouped_fold, lora_fold, reference
from tests.kernels.compare import act, check_op, frozen, rel_err

K, T, IN, OUT, R = 4, 37, 40, 48, 5
CASES = {
    # (bias, before, out_slots, in_slots, shift)
    "lora_only": (None, None, (), (), False),
    "shared_bias": ("shared", None, (), (), False),
    "out_scaled": ("shared", None, (1, 3), (), False),
    "dora_like": ("per_slot", (True, False, True, False), (1, 3), (), True),  # bias after the rescaling: a shift
    "in_and_out": ("per_slot", None, (0, 3), (2, 3), False),
    "lora_in_some": ("shared", None, (1,), (), False),  # slots 0 and 2 without LoRA: zero A and B, as padded
}
LORA_SLOTS = {"lora_in_some": (1, 3)}


@pytest.mark.parametrize("path", ["triton", "pytorch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_lora_linear(case: str, dtype: torch.dtype, path: str, seed: int,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Odd sizes (rows, widths and rank not multiples of any tile); rows of the trials outside `out_slots` /
    `in_slots` hold scales that must not be applied (noise here, ones in a pack). `path` pytorch is what a CPU
    runs; triton, the fold kernel and the chunk rescalings a GPU runs (under the interpreter on a CPU)."""
    if path == "pytorch":
        monkeypatch.setattr(grouped_fold, "_triton", lambda x: False)
    bias_kind, before, out_slots, in_slots, has_shift = CASES[case]
    bias = {None: None, "shared": act(OUT, dtype=dtype), "per_slot": act(K, OUT, dtype=dtype)}[bias_kind]
    scale_out = (1 + 0.3 * torch.randn(K, OUT)).to(dtype).requires_grad_(True) if out_slots else None
    shift = act(K, OUT, dtype=dtype) if has_shift else None
    scale_in = (1 + 0.3 * torch.randn(K, IN)).to(dtype).requires_grad_(True) if in_slots else None
    lora_slots = LORA_SLOTS.get(case)
    A, Bt = torch.randn(K, R, IN), 0.3 * torch.randn(K, R, OUT)
    for k in set(range(K)) - set(lora_slots or range(K)):
        A[k], Bt[k] = 0, 0
    args = [act(K, T, IN, dtype=dtype), frozen(OUT, IN, dtype=dtype, scale=IN ** -0.5), bias,
            A.to(dtype).requires_grad_(True), Bt.to(dtype).requires_grad_(True), 1.5, scale_out, shift, scale_in]
    kwargs = {"before": before, "out_slots": out_slots, "in_slots": in_slots, "lora_slots": lora_slots}
    check_op("grouped_lora_linear", args, kwargs, dtype, seed, fn=grouped_fold.grouped_lora_linear)


def test_fold_stack_is_each_trials_fold(seed: int) -> None:
    """The Triton fold of K trials' updates onto one shared weight equals each W + s B_k A_k."""
    w, A, B = torch.randn(70, 33), torch.randn(3, 6, 33), torch.randn(3, 70, 6)
    got = lora_fold.fold_stack(w, A, B, 0.7, torch.float32)
    torch.testing.assert_close(got, w + 0.7 * torch.bmm(B, A), rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def test_a_trained_weight_is_refused() -> None:
    """The fold makes no gradient for W: a trainable one is an error, not a silently frozen weight."""
    w = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        grouped_fold.grouped_lora_linear(torch.randn(2, 5, 3), w, None, torch.randn(2, 1, 3), torch.randn(2, 1, 4), 1.0)


def test_strided_input_and_wider_vectors(seed: int) -> None:
    """A chunked input that is a slice of a wider tensor (the Triton rescalings address rows as row x width) and
    fp32 scales with bf16 activations are taken as the reference takes them."""
    x = torch.randn(K, T, IN + 8)[..., :IN].requires_grad_(True)  # a strided view: rows IN + 8 apart
    assert not x.is_contiguous()
    w = torch.randn(OUT, IN) * IN ** -0.5
    A, Bt = torch.randn(K, R, IN, requires_grad=True), torch.randn(K, R, OUT, requires_grad=True)
    si = (1 + 0.3 * torch.randn(K, IN)).requires_grad_(True)
    so = (1 + 0.3 * torch.randn(K, OUT)).requires_grad_(True)
    kw = {"out_slots": (0, 2), "in_slots": (1, 2)}
    got = grouped_fold.grouped_lora_linear(x, w, None, A, Bt, 1.5, so, None, si, **kw)
    ins = [x, A, Bt, so, si]
    grads = torch.autograd.grad(got.square().sum(), ins)
    ref = reference.grouped_lora_linear(x, w, None, A, Bt, 1.5, so, None, si, **kw)
    ref_grads = torch.autograd.grad(ref.square().sum(), ins)
    assert rel_err(got, ref) <= 1e-5, seed
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 1e-5, seed
    xb = x.detach().to(torch.bfloat16)
    mixed = grouped_fold.grouped_lora_linear(xb, w.to(torch.bfloat16), None, A, Bt, 1.5, so, None, si, **kw)
    assert mixed.dtype == torch.bfloat16
    assert rel_err(mixed, ref) <= 2e-2, seed
