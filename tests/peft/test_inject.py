"""The injector: identity at init, parameter counts, placement, and bad specs."""

from __future__ import annotations

import pytest
import torch

from autopeft.errors import UserError
from autopeft.models import get_layers
from autopeft.peft import ModelDims, head_param_count, inject, peft_param_count
from autopeft.peft.linear import PeftLinear
from autopeft.spec import PeftSpec
from tests.conftest import tiny_model

SPECS = {
    "lora": {"lora": {"rank": {"q": 4, "v": {0: 2, 2: 8}}, "alpha_ratio": 2.0}},
    "lora_all_rslora": {"lora": {"rank": {m: 3 for m in ("q", "k", "v", "o", "ffn_in", "ffn_out")}, "rslora": True}},
    "dora": {"lora": {"rank": {"q": 4, "ffn_out": 2}, "dora": True}},
    "serial_pfeiffer": {"serial_adapter": {"size": 8}},
    "serial_houlsby": {"serial_adapter": {"size": [4, 0, 16], "position": "houlsby", "activation": "gelu"}},
    "parallel": {"parallel_adapter": {"size": {1: 8}, "scale": 2.0}},
    "prefix_gated": {"prefix": {"length": 5}},
    "ia3": {"ia3": ["k", "v", "ffn_out"]},
    "bitfit": {"bitfit": {0: True, 2: True}},
    "mixed": {"lora": {"rank": {"q": 2}}, "ia3": {"q": True, "o": True}, "serial_adapter": 4,
              "parallel_adapter": 4, "prefix": 3},
}


def _inputs(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 30000, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding must be respected by every method
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _randomize(model: torch.nn.Module) -> None:
    """Give every added parameter a non-trivial value, so a test of behaviour is not a test of zeros."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith(("classifier", "score")):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("name", list(SPECS))
def test_identity_at_init_and_closed_form_count(family: str, name: str) -> None:
    if family == "llama" and name == "bitfit":
        pytest.skip("Llama has no biases: covered by test_bitfit_without_biases_is_a_user_error")
    base = tiny_model(family)
    model = tiny_model(family)
    batch = _inputs(family)
    with torch.no_grad():
        ref = base(**batch).logits
    spec = PeftSpec.from_dict(SPECS[name], num_layers=3)
    info = inject(model, spec)
    with torch.no_grad():
        out = model(**batch).logits
    assert (out - ref).abs().max().item() <= 1e-6, "a freshly injected model must compute the backbone's function"

    dims = ModelDims.from_config(model.config)
    expected = peft_param_count(spec, dims) + head_param_count(model.config.model_type, dims.hidden, 2)
    measured = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info.trainable_params == measured == expected
    assert info.backbone_params == sum(p.numel() for p in base.parameters()) - head_param_count(
        model.config.model_type, dims.hidden, 2)

    # ... and after training has moved the parameters, the model really changes and gradients reach them
    _randomize(model)
    model.train()
    hidden = model.base_model(**batch).last_hidden_state
    with torch.no_grad():
        ref_hidden = base.base_model(**batch).last_hidden_state
    assert (hidden - ref_hidden).abs().max().item() > 1e-2 * ref_hidden.abs().max().item()
    model(**batch).logits.sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad and "autopeft_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        if not p.requires_grad:
            assert p.grad is None


def test_ungated_prefix_matches_hf_layout_and_is_not_identity() -> None:
    """HF-style prefix (gate: false) has HF's parameter count and, like HF's, changes the output at init."""
    base, model = tiny_model("bert"), tiny_model("bert")
    batch = _inputs("bert")
    spec = PeftSpec.from_dict({"prefix": {"length": 4, "gate": False}}, num_layers=3)
    inject(model, spec)
    with torch.no_grad():
        assert (model(**batch).logits - base(**batch).logits).abs().max() > 1e-5
    assert peft_param_count(spec, ModelDims.from_config(model.config)) == 3 * 2 * 4 * 32


def test_prefix_respects_padding() -> None:
    """Padding tokens must not leak into real tokens' outputs: pad differently, get the same logits."""
    model = tiny_model("bert")
    inject(model, PeftSpec.from_dict({"prefix": {"length": 3, "gate": False}}, num_layers=3))
    ids = torch.randint(5, 30000, (1, 6))
    short = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded = model(input_ids=padded_ids, attention_mask=mask).logits
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)


def test_placement_follows_the_spec() -> None:
    model = tiny_model("bert")
    spec = PeftSpec.from_dict({"lora": {"rank": {"q": {1: 4}}}, "serial_adapter": {"size": {2: 8}}}, num_layers=3)
    inject(model, spec)
    layers = get_layers(model)
    assert isinstance(layers[1].attention.self.query, PeftLinear)
    assert layers[1].attention.self.query.rank == 4
    assert not isinstance(layers[0].attention.self.query, PeftLinear)
    assert not isinstance(layers[1].attention.self.value, PeftLinear)
    assert hasattr(layers[2], "autopeft_serial_ffn") and not hasattr(layers[0], "autopeft_serial_ffn")
    assert not hasattr(layers[2], "autopeft_serial_attn")  # pfeiffer: after the FFN only


def test_llama_ffn_in_adapts_gate_and_up() -> None:
    model = tiny_model("llama")
    inject(model, PeftSpec.from_dict({"lora": {"rank": {"ffn_in": 2}}}, num_layers=3))
    mlp = get_layers(model)[0].mlp
    assert isinstance(mlp.gate_proj, PeftLinear) and isinstance(mlp.up_proj, PeftLinear)


def test_bitfit_without_biases_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no bias terms"):
        inject(tiny_model("llama"), PeftSpec.from_dict({"bitfit": True}, num_layers=3))


def test_depth_mismatch_and_double_injection_are_user_errors() -> None:
    model = tiny_model("bert")
    with pytest.raises(UserError, match="layers"):
        inject(model, PeftSpec.from_dict({"serial_adapter": 4}, num_layers=5))
    inject(model, PeftSpec.from_dict({"serial_adapter": 4}, num_layers=3))
    with pytest.raises(UserError, match="already"):
        inject(model, PeftSpec.from_dict({"serial_adapter": 4}, num_layers=3))


def test_empty_spec_trains_only_the_head() -> None:
    model = tiny_model("bert")
    info = inject(model, PeftSpec(num_layers=3))
    assert info.trainable_params == info.head_params == 32 * 2 + 2
