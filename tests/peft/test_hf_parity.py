"""Our trainable-parameter counts equal HF PEFT's for the configurations both can express."""

from __future__ import annotations

import pytest

from autopeft.peft import inject
from autopeft.spec import PeftSpec
from tests.conftest import tiny_model

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e '.[test]')")


def _hf_trainable(config) -> int:
    model = peft.get_peft_model(tiny_model("bert"), config)
    trainable, _ = model.get_nb_trainable_parameters()
    return trainable


def _ours(spec: dict) -> int:
    return inject(tiny_model("bert"), PeftSpec.from_dict(spec, num_layers=3)).trainable_params


def test_lora_heterogeneous_ranks_match_hf() -> None:
    hf = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value", "dense"],
                         layers_to_transform=[0, 2],
                         rank_pattern={"encoder.layer.2.attention.self.query": 2, "intermediate.dense": 4,
                                       "attention.output.dense": 1})
    # "dense" matches o (attention.output.dense), ffn_in (intermediate.dense) and ffn_out (output.dense);
    # HF's rank_pattern matches a suffix, so "attention.output.dense" wins over plain "dense" for o.
    ours = {"lora": {"rank": {"q": {0: 8, 2: 2}, "v": {0: 8, 2: 8}, "o": {0: 1, 2: 1},
                              "ffn_in": {0: 4, 2: 4}, "ffn_out": {0: 8, 2: 8}}, "alpha_ratio": 2.0}}
    assert _ours(ours) == _hf_trainable(hf)


def test_dora_matches_hf() -> None:
    hf = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], use_dora=True)
    assert _ours({"lora": {"rank": {"q": 4, "v": 4}, "dora": True}}) == _hf_trainable(hf)


def test_ia3_matches_hf() -> None:
    # HF's BERT default: key, value and every "output.dense" (attention output and FFN output), the latter
    # as feed-forward modules (input scaled); ours: k, v (output scaled) and o, ffn_out (input scaled).
    hf = peft.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                        feedforward_modules=["output.dense"])
    assert _ours({"ia3": ["k", "v", "o", "ffn_out"]}) == _hf_trainable(hf)


def test_prefix_matches_hf() -> None:
    hf = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=7)
    assert _ours({"prefix": {"length": 7, "gate": False}}) == _hf_trainable(hf)
