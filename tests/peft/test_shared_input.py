"""LoRA linears reading one input (q/k/v, gate/up) share one x A^T: the same function and gradients as
unshared linears, in fp64, and only where the input is provably the same tensor."""

from __future__ import annotations

import pytest
import torch

from autopeft import kernels
from autopeft.models import get_layers
from autopeft.peft import inject
from autopeft.peft.linear import PeftLinear, SharedInputLora
from autopeft.spec import PeftSpec
from tests.conftest import tiny_model

LAYERS = 2
# different ranks per member, an IA3 output scale on a member, BitFit training the base biases (BERT)
SPEC = {"lora": {"rank": {"q": 2, "k": 3, "v": 4, "o": 2, "ffn_in": 3, "ffn_out": 1}},
        "ia3": {"k": True, "ffn_in": True}}
GROUPED = {"bert": 3, "llama": 5}  # tied linears per layer: q/k/v; q/k/v and gate/up


def _model(family: str, spec: dict, share: bool, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    model = tiny_model(family, layers=LAYERS)
    inject(model, PeftSpec.from_dict(spec, num_layers=LAYERS), share_input=share)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B starts at zero: move every trained tensor so the test is not a test of zeros
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype).train()


def _step(model: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    x = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=x, attention_mask=mask).logits
    (logits * torch.linspace(-1, 2, logits.numel(), dtype=logits.dtype).view_as(logits)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits, {"inputs_embeds": x.grad, **grads}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_shared_equals_unshared_fp64(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {**SPEC, "bitfit": True} if family == "bert" else SPEC
    shared, plain = _model(family, spec, True), _model(family, spec, False)
    groups = {m.lora_group for m in shared.modules() if isinstance(m, PeftLinear) and m.lora_group is not None}
    assert sum(len(g.members) for g in groups) == GROUPED[family] * LAYERS
    assert not any(isinstance(m, PeftLinear) and m.lora_group is not None for m in plain.modules())

    calls = []
    multi = kernels.lora_linear_multi
    monkeypatch.setattr(kernels, "lora_linear_multi", lambda *a, **k: calls.append(1) or multi(*a, **k))
    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    embeds = plain.get_input_embeddings()(ids).detach()
    y_s, g_s = _step(shared, embeds, mask)
    assert len(calls) == len(groups), "each group computes its shared product once per forward"
    assert all(g._x is None and g._outs == [] for g in groups), "nothing kept past the forward pass"
    y_p, g_p = _step(plain, embeds, mask)
    torch.testing.assert_close(y_s, y_p, rtol=1e-12, atol=1e-12)
    assert g_s.keys() == g_p.keys()
    for name in g_p:
        assert g_s[name] is not None and g_p[name] is not None, name
        torch.testing.assert_close(g_s[name], g_p[name], rtol=1e-11, atol=1e-12, msg=name)


@pytest.mark.parametrize("spec", [
    {"lora": {"rank": {"q": 4, "k": 4, "v": 4}, "dropout": 0.1}},  # one dropout mask per linear (as HF)
    {"lora": {"rank": {"q": 4, "k": 4, "v": 4}, "dora": True}},  # per-row rescaling
    {"lora": {"rank": {"q": 4, "o": 4, "ffn_out": 4}}},  # no two of them read one input
])
def test_not_shared_where_it_would_change_the_function(spec: dict) -> None:
    model = tiny_model("bert", layers=LAYERS)
    inject(model, PeftSpec.from_dict(spec, num_layers=LAYERS))
    assert not any(isinstance(m, PeftLinear) and m.lora_group is not None for m in model.modules())


def test_partial_group_ties_only_lora_members() -> None:
    """LoRA on q and v, IA3 alone on k: q and v share, k (no LoRA) stays on its own."""
    model = tiny_model("bert", layers=LAYERS)
    inject(model, PeftSpec.from_dict({"lora": {"rank": {"q": 2, "v": 4}}, "ia3": ["k"]}, num_layers=LAYERS))
    attn = get_layers(model)[0].attention.self
    assert attn.query.lora_group is attn.value.lora_group is not None
    assert attn.key.lora_group is None and len(attn.query.lora_group.members) == 2


def test_kept_outputs_only_for_the_same_unchanged_tensor() -> None:
    """Called out of the backbone's pattern (other inputs, an in-place change, a member twice, inference
    mode), every member still returns its own linear's output."""
    model = _model("llama", SPEC, True, torch.float32)
    attn = get_layers(model)[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    group = q.lora_group
    assert isinstance(group, SharedInputLora) and group.members == (q, k, v)

    def own(m: PeftLinear, x: torch.Tensor) -> torch.Tensor:
        y = kernels.reference.lora_linear(x, m.base_layer.weight, m.base_layer.bias, m.autopeft_lora_A,
                                          m.autopeft_lora_B, m.scaling)
        return y * m.autopeft_ia3 if m.ia3 == "out" else y

    x1, x2 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    for m, x in ((q, x1), (k, x2), (v, x1), (q, x1), (q, x1), (k, x1), (v, x2)):
        torch.testing.assert_close(m(x), own(m, x), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(v(x), own(v, x), rtol=1e-5, atol=1e-6)
    x.mul_(2.0)  # the same tensor object, new values: kept outputs must not be used
    torch.testing.assert_close(q(x), own(q, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k(x), own(k, x), rtol=1e-5, atol=1e-6)
    group.clear()
    with torch.inference_mode():
        x = torch.randn(2, 5, 32)
        for m in (q, k, v):
            torch.testing.assert_close(m(x), own(m, x), rtol=1e-5, atol=1e-6)
    assert group._x is None
