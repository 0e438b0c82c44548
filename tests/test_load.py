"""`autopeft.load`: every method (mixed ones too) comes back from an export computing exactly the same logits.

Adapter weights are randomised before export so that no tensor is trivially zero (a fresh LoRA B, adapter
up-projection or prefix gate is zero, and would hide a tensor that failed to load).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import autopeft
from autopeft.errors import UserError
from autopeft.export import export_model
from autopeft.peft import inject
from autopeft.spec import PeftSpec
from tests.conftest import tiny_model

TRIAL_CONFIG = {"task": "glue/sst2", "backbone": "minilm", "fidelity": {"train_examples": 64, "max_steps": 2}}

#: one spec per method, and mixed ones; 3-layer tiny models
SPECS = {
    "lora": ("bert", {"lora": {"rank": {"q": [4, 0, 2], "v": 4, "ffn_out": [0, 8, 8]}, "alpha_ratio": 2.0}}),
    "dora": ("bert", {"dora": {"rank": {"q": 4, "o": [0, 2, 2]}}}),
    "serial-pfeiffer": ("bert", {"serial_adapter": {"size": [8, 0, 4]}}),
    "serial-houlsby": ("bert", {"serial_adapter": {"size": 4, "position": "houlsby", "activation": "gelu"}}),
    "parallel": ("bert", {"parallel_adapter": {"size": [0, 8, 8], "scale": 2.0}}),
    "prefix-gated": ("bert", {"prefix": {"length": [3, 0, 2], "gate": True}}),
    "prefix-ungated": ("bert", {"prefix": {"length": 3, "gate": False}}),
    "ia3": ("bert", {"ia3": ["k", "v", "o", "ffn_out"]}),
    "bitfit": ("bert", {"bitfit": [True, False, True]}),
    "mixed-all": ("bert", {"lora": {"rank": {"q": [4, 0, 2]}}, "ia3": {"v": True, "q": [0, 1, 1]},
                           "serial_adapter": 4, "parallel_adapter": {"size": [0, 4, 0]},
                           "prefix": {"length": [2, 2, 0]}, "bitfit": [False, True, False]}),
    "llama-mixed": ("llama", {"dora": {"rank": {"q": 2, "ffn_in": [0, 4, 4]}}, "parallel_adapter": 4,
                              "prefix": {"length": 2, "gate": False}, "ia3": ["ffn_out"]}),
}


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every trainable tensor a non-trivial value: scales near 1, everything else small and random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("autopeft_ia3", "autopeft_dora_magnitude")):
                p.mul_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.add_(0.1 * noise)
            else:
                p.copy_(0.3 * noise)


def trained(family: str, spec_dict: dict) -> tuple[torch.nn.Module, PeftSpec]:
    model = tiny_model(family)
    spec = PeftSpec.from_dict(spec_dict, num_layers=3)
    inject(model, spec)
    randomize(model)
    return model.eval(), spec


def batch(family: str = "bert", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding, so masks (and the prefix's extension of them) are exercised
    if family == "llama":
        ids[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


@pytest.mark.parametrize("case", sorted(SPECS))
def test_load_round_trip_every_method(case: str, tmp_path: Path) -> None:
    family, spec_dict = SPECS[case]
    model, spec = trained(family, spec_dict)
    report = export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None, formats="autopeft")
    assert "autopeft" in report.written
    loaded = autopeft.load(tiny_model(family), tmp_path / "out")
    assert loaded.autopeft_spec == spec
    inputs = batch(family)
    assert torch.allclose(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=0)
    # and the export is not a no-op: the bare backbone answers differently
    assert not torch.allclose(logits(tiny_model(family), inputs), logits(model, inputs), atol=1e-3)


def test_load_from_a_backbone_name_or_the_one_in_the_yaml(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    import shutil

    from autopeft.models import load_backbone

    backbone = tmp_path / "headless"  # a pre-trained encoder without a head, like a hub backbone
    tiny_model("bert", layers=2).bert.save_pretrained(backbone)
    for f in tiny_backbone_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, backbone / f.name)
    model, _ = load_backbone(str(backbone), 3)  # a 3-label head: `load` must read that size off the weights
    spec = PeftSpec.from_dict({"lora": {"rank": {"v": 4}}, "serial_adapter": 4}, num_layers=2)
    inject(model, spec)
    randomize(model)
    export_model(model.eval(), spec, tmp_path / "out", trial_config={**TRIAL_CONFIG, "backbone": str(backbone)},
                 metrics=None)
    inputs = batch()
    expected = logits(model, inputs)
    by_name = autopeft.load(str(backbone), tmp_path / "out")
    from_yaml = autopeft.load(None, tmp_path / "out")
    assert by_name.config.num_labels == 3
    assert torch.allclose(logits(by_name, inputs), expected, atol=1e-5, rtol=0)
    assert torch.allclose(logits(from_yaml, inputs), expected, atol=1e-5, rtol=0)


def test_load_leaves_the_callers_rng_alone(tmp_path: Path) -> None:
    model, spec = trained("bert", SPECS["prefix-gated"][1])
    export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None)
    base = tiny_model("bert")  # (seeds the RNG itself)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    autopeft.load(base, tmp_path / "out")
    assert torch.equal(torch.get_rng_state(), state)


def test_autopeft_load_stays_the_function_after_importing_the_module() -> None:
    import autopeft.loading  # a submodule named `load` would have replaced the function

    assert callable(autopeft.load)


# ----- strictness: a file that does not fit its spec fails loudly ----------------------------------------------
@pytest.fixture
def exported(tmp_path: Path) -> Path:
    model, spec = trained("bert", SPECS["mixed-all"][1])
    export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None)
    return tmp_path / "out"


def _rewrite_weights(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "autopeft_weights.safetensors"))
    change(weights)
    save_file(weights, str(path / "autopeft_weights.safetensors"))


def test_missing_tensor_is_an_error(exported: Path) -> None:
    _rewrite_weights(exported, lambda w: w.pop(next(k for k in w if "autopeft_serial" in k)))
    with pytest.raises(UserError, match="lack 1 trainable tensor"):
        autopeft.load(tiny_model("bert"), exported)


def test_unexpected_tensor_is_an_error(exported: Path) -> None:
    _rewrite_weights(exported, lambda w: w.update({"bert.pooler.dense.bias": torch.zeros(32)}))
    with pytest.raises(UserError, match="does not train"):
        autopeft.load(tiny_model("bert"), exported)


def test_head_of_another_size_says_which(exported: Path) -> None:
    with pytest.raises(UserError, match="num_labels=2"):
        autopeft.load(tiny_model("bert", num_labels=5), exported)


def test_backbone_of_another_depth_is_an_error(exported: Path) -> None:
    with pytest.raises(UserError, match="3 layers"):
        autopeft.load(tiny_model("bert", layers=2), exported)


def test_not_an_export_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not an autopeft export"):
        autopeft.load(tiny_model("bert"), tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        autopeft.load(tiny_model("bert"), tmp_path / "nope")
