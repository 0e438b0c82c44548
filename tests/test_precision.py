"""LayerNorms in a low-precision backbone's dtype (autopeft/precision.py): which models get them, that they
compute what a LayerNorm computes, that a trained LayerNorm still trains; on a CUDA GPU, that autocast no longer
turns the residual stream into fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from autopeft import precision
from autopeft.models import load_backbone
from autopeft.precision import DtypeLayerNorm, keep_norm_dtype
from tests.conftest import tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: CPU autocast never runs layer_norm in fp32")


def _norms(model: nn.Module) -> list[nn.LayerNorm]:
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm)]


def test_every_layernorm_is_swapped_in_place_keeping_its_parameters() -> None:
    model = tiny_model("bert").to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = len(_norms(model))
    assert n == 1 + 2 * 3  # the embeddings', then attention output's and FFN output's in each of the 3 layers
    assert keep_norm_dtype(model) == n
    assert all(type(m) is DtypeLayerNorm for m in _norms(model))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert keep_norm_dtype(model) == 0  # idempotent


def test_the_loader_swaps_only_low_precision_backbones(tiny_backbone_dir: Path) -> None:
    bf16, _ = load_backbone(str(tiny_backbone_dir), 2, dtype=torch.bfloat16)
    fp32, _ = load_backbone(str(tiny_backbone_dir), 2)
    assert _norms(bf16) and all(type(m) is DtypeLayerNorm for m in _norms(bf16))
    assert _norms(fp32) and all(type(m) is nn.LayerNorm for m in _norms(fp32))


@pytest.mark.parametrize("trained", [False, True])
def test_output_and_gradients_match_a_layernorm_in_fp32(trained: bool) -> None:
    torch.manual_seed(0)
    ref = nn.LayerNorm(48)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = DtypeLayerNorm(48)
    ours.load_state_dict(ref.state_dict())
    if not trained:  # frozen, in the backbone's dtype; trained (BitFit): fp32 parameters, as the trainer keeps them
        ours.to(torch.bfloat16).requires_grad_(False)
    x = (torch.randn(4, 7, 48) * 3 + 1).bfloat16().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    y = ours(x)
    y_ref = ref.double()(x_ref)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(y_ref)
    y.backward(g.bfloat16())
    y_ref.backward(g)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=3e-2, atol=3e-2)
    if trained:
        assert ours.weight.grad.dtype == torch.float32
        torch.testing.assert_close(ours.weight.grad.double(), ref.weight.grad, rtol=3e-2, atol=1e-1)
        torch.testing.assert_close(ours.bias.grad.double(), ref.bias.grad, rtol=3e-2, atol=1e-1)


def test_full_precision_inputs_are_a_plain_layernorm() -> None:
    torch.manual_seed(0)
    ref = nn.LayerNorm(16)
    ours = DtypeLayerNorm(16)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(ours(x), ref(x))


@needs_cuda
def test_autocast_keeps_the_residual_stream_in_the_backbones_dtype() -> None:
    model = tiny_model("bert").to("cuda", torch.bfloat16)
    ids = torch.randint(1000, 2000, (2, 16), device="cuda")
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for m in _norms(model)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids)
    assert set(seen) == {torch.float32}  # autocast's own: what the trainer ran before
    keep_norm_dtype(model)
    seen.clear()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids)
        assert set(seen) == {torch.bfloat16}
        seen.clear()
        precision.FP32_NORMS = True
        try:
            model(input_ids=ids)
        finally:
            precision.FP32_NORMS = False
        assert set(seen) == {torch.float32}
    for h in hooks:
        h.remove()
