"""`autopeft export`: HF PEFT adapter dirs that compute our logits, honest refusals, atomic writes, study picks.

The HF round trips load the export with `peft.PeftModel.from_pretrained(fresh_base, DEST)` (the user's own
call) and hold its logits to ours within 1e-4 (fp32). Adapter weights are randomised first, so a tensor that
failed to load, or landed transposed or on the wrong module, cannot hide behind a zero init.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autopeft.errors import UserError
from autopeft.export import ExportReport, export_command, export_model, export_trial, parse_pick, pick_and_dest
from autopeft.peft import inject, trainable_state_dict
from autopeft.spec import PeftSpec
from tests.conftest import tiny_model
from tests.test_load import TRIAL_CONFIG, batch, logits, randomize, trained

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e '.[test]')")

HF_CASES = {
    # ranks differ per layer and per module, some layers have none; alpha = 2 * rank everywhere
    "lora-heterogeneous": ("bert", {"lora": {"rank": {"q": [4, 0, 2], "v": [4, 4, 0], "o": [2, 0, 0],
                                                      "ffn_out": [0, 8, 8]}, "alpha_ratio": 2.0}}),
    "lora-rslora-layers": ("bert", {"lora": {"rank": {"q": [4, 0, 4], "v": [2, 0, 2]}, "rslora": True}}),
    "dora": ("bert", {"dora": {"rank": {"q": [4, 0, 2], "v": 4, "ffn_in": 2}}}),
    "ia3-k-v-ffn_out": ("bert", {"ia3": ["k", "v", "ffn_out"]}),
    "ia3-with-o": ("bert", {"ia3": {"k": True, "o": [1, 0, 1], "ffn_out": [0, 1, 1]}}),
    "llama-lora": ("llama", {"lora": {"rank": {"q": [4, 0, 2], "ffn_in": 2, "ffn_out": [0, 4, 4]}}}),
    "llama-dora": ("llama", {"dora": {"rank": {"k": 2, "o": [0, 4, 4]}}}),
    "llama-ia3": ("llama", {"ia3": ["k", "v", "o", "ffn_in", "ffn_out"]}),
}


def hf_load(family: str, dest: Path) -> torch.nn.Module:
    return peft.PeftModel.from_pretrained(tiny_model(family), str(dest)).eval()


def no_leftovers(parent: Path, name: str) -> None:
    """Nothing of a failed export is left: no DEST, no temp dir beside it."""
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if name in p.name] == []


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_peft_round_trip(case: str, tmp_path: Path) -> None:
    family, spec_dict = HF_CASES[case]
    model, spec = trained(family, spec_dict)
    report = export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None, formats="hf")
    assert "hf-peft" in report.written
    inputs = batch(family)
    ours, theirs = logits(model, inputs), logits(hf_load(family, tmp_path / "out"), inputs)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert not torch.allclose(logits(tiny_model(family), inputs), ours, atol=1e-3)  # the adapter does something


def test_lora_config_carries_per_module_ranks_and_alphas(tmp_path: Path) -> None:
    model, spec = trained(*HF_CASES["lora-heterogeneous"])
    export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8  # the most common rank; alpha = alpha_ratio * rank
    assert sorted(cfg["rank_pattern"].values()) == [2, 2, 8, 8]
    assert {cfg["alpha_pattern"][k] for k in cfg["rank_pattern"]} == {4, 16}
    assert all(cfg["alpha_pattern"][k] == 2 * r for k, r in cfg["rank_pattern"].items())
    # q without v in layer 2 and ffn_out without o: only a full-name regex selects exactly these modules
    assert isinstance(cfg["target_modules"], str)


def test_uniform_layers_use_the_compact_form(tmp_path: Path) -> None:
    model, spec = trained(*HF_CASES["lora-rslora-layers"])
    export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["attention.self.query", "attention.self.value"]
    assert cfg["layers_to_transform"] == [0, 2] and cfg["layers_pattern"] == "layer"
    assert cfg["use_rslora"] is True


def test_ia3_input_scaled_modules_are_feedforward(tmp_path: Path) -> None:
    model, spec = trained(*HF_CASES["ia3-with-o"])
    export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None)
    hf = hf_load("bert", tmp_path / "out")
    flags = {n.split("model.bert.")[-1]: m.is_feedforward for n, m in hf.named_modules()
             if hasattr(m, "is_feedforward")}
    assert flags == {"encoder.layer.0.attention.self.key": False, "encoder.layer.1.attention.self.key": False,
                     "encoder.layer.2.attention.self.key": False, "encoder.layer.0.attention.output.dense": True,
                     "encoder.layer.2.attention.output.dense": True, "encoder.layer.1.output.dense": True,
                     "encoder.layer.2.output.dense": True}


def test_dora_saves_the_learned_magnitude(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model, spec = trained(*HF_CASES["dora"])
    export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None)
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    ours = model.bert.encoder.layer[0].attention.self.query.autopeft_dora_magnitude
    theirs = saved["base_model.model.bert.encoder.layer.0.attention.self.query.lora_magnitude_vector"]
    assert torch.equal(theirs, ours.detach())  # m itself, not ||W|| nor ||W + s·BA||


@pytest.mark.parametrize(("spec_dict", "why"), [
    ({"prefix": {"length": 3, "gate": False}}, "position ids"),
    ({"prefix": {"length": [3, 0, 2], "gate": True}}, "per-head gate"),
    ({"prefix": {"length": [3, 0, 2], "gate": False}}, "differ across layers"),
    ({"serial_adapter": 4}, "bottleneck"),
    ({"parallel_adapter": 4}, "bottleneck"),
    ({"bitfit": True}, "biases"),
    ({"lora": {"rank": {"q": 4}}, "ia3": ["v"]}, "several methods mixed"),
    ({}, "only the task head"),
])
def test_inexpressible_specs_skip_hf_with_a_reason(spec_dict: dict, why: str, tmp_path: Path) -> None:
    model, spec = trained("bert", spec_dict)
    report = export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None)
    assert "hf-peft" not in report.written and why in report.skipped["hf-peft"]
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    assert (tmp_path / "out" / "autopeft_weights.safetensors").is_file()
    with pytest.raises(UserError, match=f"cannot write the HF PEFT format.*{why}"):
        export_model(model, spec, tmp_path / "hf", trial_config=TRIAL_CONFIG, metrics=None, formats="hf")
    no_leftovers(tmp_path, "hf")


def test_hf_prefix_would_shift_positions() -> None:
    """Why ungated prefixes are not exported to HF (a canary: if it fails, transformers changed and the
    decision in export.prefix_reason needs a new look). HF PEFT hands the prefix to the model as a KV cache;
    our prefix keys/values laid out that way give our logits only if the positions are not shifted, and the
    model shifts them by the cache length."""
    from transformers import DynamicCache

    model, _ = trained("bert", {"prefix": {"length": 3, "gate": False}})
    inputs = batch()
    cache_kv = [(layer.attention.self.autopeft_prefix.key.detach().expand(3, -1, -1, -1),
                 layer.attention.self.autopeft_prefix.value.detach().expand(3, -1, -1, -1))
                for layer in model.bert.encoder.layer]
    mask = torch.cat([torch.ones(3, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    base = tiny_model("bert")
    base.classifier.load_state_dict(model.classifier.state_dict())  # the trained head
    with torch.no_grad():
        shifted = base(input_ids=inputs["input_ids"], attention_mask=mask, cache=DynamicCache(cache_kv)).logits
        kept = base(input_ids=inputs["input_ids"], attention_mask=mask, cache=DynamicCache(cache_kv),
                    position_ids=torch.arange(9).expand(3, -1)).logits
    ours = logits(model, inputs)
    assert torch.allclose(kept, ours, atol=1e-5, rtol=0)
    assert not torch.allclose(shifted, ours, atol=1e-3)


def test_hf_peft_prefix_cannot_run_on_this_transformers() -> None:
    """Canary for the other half of `prefix_reason`: peft passes the prefix as `past_key_values`, which
    transformers 5 classifiers no longer take. If this starts to pass, HF prefix export deserves a new look."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny_model("bert"), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="past key values"):
        model.eval()(**batch())


def test_prefix_reason_names_the_architecture(tmp_path: Path) -> None:
    bert, spec = trained("bert", {"prefix": {"length": 2, "gate": False}})
    llama, llama_spec = trained("llama", {"prefix": {"length": 2, "gate": False}})
    why = export_model(bert, spec, tmp_path / "b", trial_config=TRIAL_CONFIG, metrics=None).skipped["hf-peft"]
    assert "past_key_values" in why and "absolute position embeddings" in why
    why = export_model(llama, llama_spec, tmp_path / "l", trial_config=TRIAL_CONFIG, metrics=None).skipped["hf-peft"]
    assert "past_key_values" in why and "rotary" in why
    card = (tmp_path / "l" / "README.md").read_text()
    assert "not written, **hf-peft**" in card and "rotary" in card


def test_report_and_card_name_every_format(tmp_path: Path) -> None:
    model, spec = trained(*HF_CASES["lora-heterogeneous"])
    metrics = {"metric_name": "accuracy", "metric": 0.91, "dev_metric": 0.9, "trainable_params": 1234}
    report = export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=metrics)
    assert set(report.written) == {"autopeft", "hf-peft", "model card"}
    assert "ranks differ" in report.skipped["adapters"]  # AdapterHub's LoRAConfig has one r
    text = "\n".join(report.lines())
    assert "wrote hf-peft" in text and "not written adapters" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "autopeft.yaml",
        "autopeft_weights.safetensors", "metrics.json"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| dev accuracy | 0.9000 |" in card and "PeftModel.from_pretrained" in card and "autopeft.load" in card
    assert "autopeft train --config out/autopeft.yaml --fidelity full" in card
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["metric"] == 0.91


def test_yaml_retrains_at_full_fidelity(tmp_path: Path) -> None:
    from autopeft.config import load_trial_config

    model, spec = trained("bert", {"lora": {"rank": {"q": [4, 0, 2]}}, "serial_adapter": 4})
    export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None)
    cfg = load_trial_config(tmp_path / "out" / "autopeft.yaml", fidelity="full")
    assert cfg.spec == spec and cfg.task == "glue/sst2" and cfg.backbone == "minilm"
    assert cfg.fidelity.train_examples is None


# ----- refusals: one clear line, nothing half-written ---------------------------------------------------------
def test_non_empty_dest_needs_force(tmp_path: Path) -> None:
    model, spec = trained("bert", {"lora": {"rank": {"q": 2}}})
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"not empty.*--force"):
        export_model(model, spec, dest, trial_config=TRIAL_CONFIG, metrics=None)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    export_model(model, spec, dest, trial_config=TRIAL_CONFIG, metrics=None, force=True)
    assert not (dest / "keep.txt").exists() and (dest / "adapter_config.json").is_file()
    assert (dest / "adapterhub" / "adapter_config.json").is_file()  # one r on q everywhere: AdapterHub too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or swapped-out dir left


def test_dest_that_is_a_file_or_unknown_format(tmp_path: Path) -> None:
    model, spec = trained("bert", {"lora": {"rank": {"q": 2}}})
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        export_model(model, spec, tmp_path / "f", trial_config=TRIAL_CONFIG, metrics=None, force=True)
    with pytest.raises(UserError, match="unknown export format"):
        export_model(model, spec, tmp_path / "o", trial_config=TRIAL_CONFIG, metrics=None, formats="onnx")
    dora, dora_spec = trained("bert", {"dora": {"rank": {"q": 2}}})
    with pytest.raises(UserError, match=r"AdapterHub `adapters` format.*DoRA"):
        export_model(dora, dora_spec, tmp_path / "o", trial_config=TRIAL_CONFIG, metrics=None, formats="adapters")
    no_leftovers(tmp_path, "o")


def test_a_failure_while_writing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import autopeft.export as export

    model, spec = trained("bert", {"lora": {"rank": {"q": 2}}})

    def boom(**kwargs: object) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setattr("autopeft.model_card.render_model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_model(model, spec, tmp_path / "a" / "b" / "out", trial_config=TRIAL_CONFIG, metrics=None)
    assert list(tmp_path.iterdir()) == []  # not even the parents it had to create


# ----- the real packaged MiniLM (6 layers) on SST-2 dev sentences -------------------------------------------
MINILM_CASES = {  # name: (spec, HF PEFT method expected, or None where only autopeft.load can express it)
    "lora-heterogeneous": ({"lora": {"rank": {"q": [8, 0, 4, 4, 0, 2], "v": 4, "ffn_out": [0, 0, 0, 2, 2, 2]},
                                     "alpha_ratio": 2.0}}, "LoRA with per-module ranks"),
    "dora": ({"dora": {"rank": {"q": [4, 4, 0, 0, 2, 2], "v": 4}}}, "DoRA with per-module ranks"),
    "ia3": ({"ia3": {"k": True, "v": True, "ffn_out": [0, 0, 1, 1, 1, 1]}}, "IA3"),
    "prefix-ungated": ({"prefix": {"length": 4, "gate": False}}, None),
    "prefix-gated": ({"prefix": {"length": [4, 4, 0, 0, 2, 2], "gate": True}}, None),
    "serial-houlsby": ({"serial_adapter": {"size": 8, "position": "houlsby"}}, None),
    "serial-pfeiffer": ({"serial_adapter": {"size": [0, 0, 8, 8, 16, 16]}}, None),
    "parallel": ({"parallel_adapter": {"size": 8, "scale": 2.0}}, None),
    "bitfit": ({"bitfit": True}, None),
    "mixed": ({"lora": {"rank": {"q": 4}}, "ia3": ["v"], "serial_adapter": {"size": [0, 0, 0, 8, 8, 8]},
               "parallel_adapter": {"size": [8, 0, 0, 0, 0, 0]}, "prefix": {"length": [0, 2, 2, 0, 0, 0]},
               "bitfit": [False] * 5 + [True]}, None),
}


@pytest.fixture(scope="module")
def sst2_dev(shared_data: Path) -> tuple[list[str], torch.Tensor]:
    import csv

    with open(shared_data / "glue" / "sst2" / "dev.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:64]
    return [r["sentence"] for r in rows], torch.tensor([int(r["label"]) for r in rows])


@pytest.mark.parametrize("case", list(MINILM_CASES))
def test_minilm_round_trip_on_sst2_dev(case: str, sst2_dev, tmp_path: Path) -> None:
    """HF PEFT (LoRA, DoRA, IA3) and autopeft.load (every method) give our logits (<= 1e-4) and the logged
    accuracy on SST-2 dev sentences; prefix is refused for HF with its reason (see prefix_reason)."""
    import autopeft
    from autopeft.models import load_backbone

    spec_dict, hf_method = MINILM_CASES[case]
    sentences, labels = sst2_dev
    model, tokenizer = load_backbone("minilm", 2)
    spec = PeftSpec.from_dict(spec_dict, num_layers=model.config.num_hidden_layers)
    inject(model, spec)
    randomize(model, seed=7)
    model.eval()
    enc = dict(tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    ours = logits(model, enc)
    logged_accuracy = (ours.argmax(-1) == labels).float().mean().item()
    report = export_model(model, spec, tmp_path / "out", trial_config={**TRIAL_CONFIG, "fidelity": {}},
                          metrics={"metric_name": "accuracy", "metric": logged_accuracy})
    assert report.hf_method == hf_method
    loaded = [autopeft.load(load_backbone("minilm", 2)[0], tmp_path / "out")]
    if hf_method:
        loaded.append(peft.PeftModel.from_pretrained(load_backbone("minilm", 2)[0], str(tmp_path / "out")).eval())
    else:
        assert report.skipped["hf-peft"] and not (tmp_path / "out" / "adapter_config.json").exists()
    for other in loaded:
        theirs = logits(other, enc)
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert (theirs.argmax(-1) == labels).float().mean().item() == logged_accuracy


# ----- from a study: a small real Optuna SQLite study made by hand ------------------------------------------
SENTENCES = ["a gripping , funny film", "dull and lifeless", "the best of the year", "a waste of two hours",
             "warm and wise", "nothing works here", "it sparkles", "flat , tired jokes"]
LABELS = [1, 0, 1, 0, 1, 0, 1, 0]


@pytest.fixture(scope="module")
def study_dir(tiny_backbone_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trials: 0 LoRA (COMPLETE), 1 FAILED, 2 IA3 (small), 3 mixed (best feasible), 4 infeasible (best metric),
    5 trial 1's infeasible stand-in."""
    import optuna
    from optuna.trial import TrialState, create_trial
    from safetensors.torch import save_file

    from autopeft.models import load_backbone

    out = tmp_path_factory.mktemp("runs")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="sst2", storage=f"sqlite:///{out / 'optuna.db'}",
                                directions=["maximize", "minimize", "minimize"])
    for k, v in {"task": "glue/sst2", "backbone": str(tiny_backbone_dir), "num_layers": 2,
                 "fidelity": {"train_examples": 64, "epochs": 1.0}, "data": {"data_dir": None}}.items():
        study.set_user_attr(k, v)
    specs = {0: {"lora": {"rank": {"q": [4, 0], "v": [2, 4]}}}, 2: {"ia3": ["k", "ffn_out"]},
             3: {"lora": {"rank": {"q": 4}}, "serial_adapter": 8}, 4: {"lora": {"rank": {"v": 8}}}}
    metrics = {0: 0.80, 2: 0.795, 3: 0.85, 4: 0.90}
    for number in range(5):
        if number == 1:
            study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"autopeft.fail_reason": "oom"}))
            continue
        model, tokenizer = load_backbone(str(tiny_backbone_dir), 2)
        spec = PeftSpec.from_dict(specs[number], num_layers=2)
        inject(model, spec)
        randomize(model, seed=number)
        model.eval()
        path = out / f"trial-{number}.safetensors"
        save_file(trainable_state_dict(model), str(path))
        enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        preds = logits(model, dict(enc)).argmax(-1).tolist()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        attrs = {"spec": spec.to_dict(), "spec_summary": spec.summary(), "weights_path": str(path),
                 "metric_name": "accuracy", "metric": metrics[number], "trainable_params": params,
                 "trainable_pct": 1.0, "peak_memory_mb": 10.0,
                 "dev_metric": sum(p == y for p, y in zip(preds, LABELS)) / len(LABELS),
                 "constraints": [1.0] if number == 4 else [-1.0]}
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[metrics[number], params, 10.0],
                                     user_attrs=attrs))
    # 5: the COMPLETE stand-in that tells the sampler trial 1 was infeasible (autopeft.worker.record_infeasible)
    study.add_trial(create_trial(state=TrialState.COMPLETE, values=[0.5, 6.0, 10.0],
                                 user_attrs={"autopeft.shadow_of": 1, "autopeft.fail_reason": "oom",
                                             "constraints": [1.0]}, system_attrs={"constraints": [1.0]}))
    return out


def test_export_trial_round_trips_through_hf(study_dir: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from autopeft.models import load_backbone

    report = export_trial("sst2", out=str(study_dir), trial=0, dest=tmp_path / "out")
    assert isinstance(report, ExportReport) and report.source == "study sst2 trial 0"
    assert "hf-peft" in report.written
    base, tokenizer = load_backbone(str(tiny_backbone_dir), 2)
    hf = peft.PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    preds = logits(hf, dict(enc)).argmax(-1).tolist()
    dev = sum(p == y for p, y in zip(preds, LABELS)) / len(LABELS)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert dev == metrics["dev_metric"]  # the same dev accuracy as the trial logged
    import autopeft

    ours = autopeft.load(None, tmp_path / "out")
    assert torch.allclose(logits(ours, dict(enc)), logits(hf, dict(enc)), atol=1e-4, rtol=0)


def test_export_command_prints_formats(study_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert export_command("sst2", out=str(study_dir), trial=3, dest=str(tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "wrote autopeft" in printed and "not written hf-peft: several methods mixed" in printed


@pytest.mark.parametrize(("pick", "expected"), [
    ("best-metric", 3),  # trial 4 scores higher but breaks a constraint
    ("smallest-within 0.5", 3),
    ("smallest-within=6", 2),  # 0.795 is within 6 points of 0.85, and IA3 is the smallest
])
def test_pick_rules(pick: str, expected: int, study_dir: Path, tmp_path: Path) -> None:
    report = export_trial("sst2", out=str(study_dir), pick=pick, dest=tmp_path / "out", formats="autopeft")
    assert report.source == f"study sst2 trial {expected}"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"study_name": "nope", "trial": 0}, "no study named 'nope'"),
    ({"trial": 99}, "has no trial 99"),
    ({"trial": 1}, r"trial 1 of study 'sst2' FAILED \(oom\)"),
    ({"trial": 5}, r"only tells the sampler that trial 1 was infeasible \(oom\); it was never trained"),
    ({"trial": 3, "formats": "hf"}, "cannot write the HF PEFT format.*several methods mixed"),
    ({}, "exactly one of --trial N or --pick"),
    ({"trial": 0, "pick": "best-metric"}, "exactly one of --trial N or --pick"),
    ({"pick": "fastest"}, "unknown --pick rule"),
])
def test_bad_input_is_one_clear_error_and_no_directory(kwargs: dict, message: str, study_dir: Path,
                                                       tmp_path: Path) -> None:
    kwargs = {"study_name": "sst2", **kwargs}
    with pytest.raises(UserError, match=message):
        export_trial(kwargs.pop("study_name"), out=str(study_dir), dest=tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_existing_dest_is_refused_before_any_work(study_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_trial("nope", out=str(study_dir), trial=0, dest=tmp_path / "out")  # refused before the study lookup
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x"]


def test_weights_found_in_a_moved_out_dir(study_dir: Path, tmp_path: Path) -> None:
    import shutil

    import optuna
    from optuna.trial import TrialState, create_trial

    source = optuna.load_study(study_name="sst2", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    moved = tmp_path / "runs"
    moved.mkdir()
    study = optuna.create_study(study_name="sst2", storage=f"sqlite:///{moved / 'optuna.db'}",
                                directions=["maximize", "minimize", "minimize"])
    for k, v in source.user_attrs.items():
        study.set_user_attr(k, v)
    trial = source.trials[0]
    attrs = {**trial.user_attrs, "weights_path": "/elsewhere/artifacts/sst2/trial-0/autopeft_weights.safetensors"}
    study.add_trial(create_trial(state=TrialState.COMPLETE, values=trial.values, user_attrs=attrs))
    with pytest.raises(UserError, match="does not exist"):
        export_trial("sst2", out=str(moved), trial=0, dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    artifacts = moved / "artifacts" / "sst2" / "trial-0"
    artifacts.mkdir(parents=True)
    shutil.copy(trial.user_attrs["weights_path"], artifacts / "autopeft_weights.safetensors")
    assert "hf-peft" in export_trial("sst2", out=str(moved), trial=0, dest=tmp_path / "out").written


def test_pick_tokens_and_dest_from_argparse(study_dir: Path, tmp_path: Path) -> None:
    # `--pick smallest-within 6 OUT/` with nargs="+": DEST arrives as the last token of the rule
    dest = str(tmp_path / "out")
    assert pick_and_dest(["smallest-within", "6", dest], None) == ("smallest-within 6", dest)
    assert pick_and_dest(["best-metric"], dest) == ("best-metric", dest)
    assert pick_and_dest(None, dest) == (None, dest)
    with pytest.raises(UserError, match="unexpected argument"):
        pick_and_dest(["best-metric", "a", "b"], None)
    with pytest.raises(UserError, match="destination"):
        pick_and_dest(["best-metric"], None)
    assert export_command("sst2", out=str(study_dir), pick=["smallest-within", "6", dest], dest=None) == 0
    assert (tmp_path / "out" / "autopeft.yaml").is_file()


def test_parse_pick() -> None:
    assert parse_pick("best-metric") == ("best-metric", None)
    assert parse_pick("smallest-within 0.5") == ("smallest-within", 0.5)
    assert parse_pick("smallest-within:2") == ("smallest-within", 2.0)
    with pytest.raises(UserError):
        parse_pick("smallest-within")


# ----- through the command line, as a user runs it -------------------------------------------------------------
def test_cli_export_then_load_with_hf_and_autopeft(study_dir: Path, tiny_backbone_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    import autopeft
    from autopeft.cli import main
    from autopeft.models import load_backbone

    dest = tmp_path / "best"
    assert main(["export", "--study", "sst2", "--out", str(study_dir), "--trial", "0", str(dest)]) == 0
    printed = capsys.readouterr().out
    assert "wrote hf-peft" in printed and "wrote autopeft" in printed and "not written adapters" in printed
    base, tokenizer = load_backbone(str(tiny_backbone_dir), 2)
    enc = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    hf = logits(peft.PeftModel.from_pretrained(base, str(dest)).eval(), enc)
    ours = logits(autopeft.load(None, dest), enc)
    assert (hf - ours).abs().max().item() <= 1e-4
    logged = json.loads((dest / "metrics.json").read_text())["dev_metric"]
    assert sum(int(p == y) for p, y in zip(hf.argmax(-1).tolist(), LABELS)) / len(LABELS) == logged
    # --pick with a two-token rule before DEST, mixed methods: autopeft only, with the reason printed
    mixed = tmp_path / "mixed"
    assert main(["export", "--study", "sst2", "--out", str(study_dir), "--pick", "smallest-within", "0.5",
                 str(mixed)]) == 0
    printed = capsys.readouterr().out
    assert "trial 3" in printed and "not written hf-peft: several methods mixed" in printed
    preds = logits(autopeft.load(None, mixed), enc).argmax(-1).tolist()
    logged = json.loads((mixed / "metrics.json").read_text())["dev_metric"]
    assert sum(int(p == y) for p, y in zip(preds, LABELS)) / len(LABELS) == logged
    # the written autopeft.yaml is what `autopeft train --config ... --fidelity full` reads
    from autopeft.config import load_trial_config

    full = load_trial_config(mixed / "autopeft.yaml", fidelity="full").fidelity
    assert full.train_examples is None and full.max_steps is None and full.epochs >= 3


CLI_BAD = {
    "unknown study": (["--study", "nope", "--trial", "0"], "no study named 'nope'"),
    "unknown trial": (["--trial", "99"], "has no trial 99"),
    "failed trial": (["--trial", "1"], "FAILED (oom)"),
    "hf cannot express": (["--trial", "3", "--format", "hf"], "cannot write the HF PEFT format"),
    "adapters format": (["--trial", "2", "--format", "adapters"], "adapters"),
    "bad pick": (["--pick", "fastest"], "unknown --pick rule"),
    "trial and pick": (["--trial", "0", "--pick", "best-metric"], "exactly one of --trial N or --pick"),
    "no out dir": (["--trial", "0", "--out", "/nonexistent-autopeft"], "no study database"),
}


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_cli_bad_input_is_one_line_exit_2_no_dest(case: str, study_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from autopeft.cli import main

    args, needle = CLI_BAD[case]
    if "--study" not in args:
        args = ["--study", "sst2", *args]
    if "--out" not in args:
        args = [*args, "--out", str(study_dir)]
    assert main(["export", *args, str(tmp_path / "dest")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("autopeft: error:") and needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_non_empty_dest_needs_force(study_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from autopeft.cli import main

    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    argv = ["export", "--study", "sst2", "--out", str(study_dir), "--trial", "2", str(dest)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err and "--force" in err
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]
    assert main([*argv, "--force"]) == 0
    assert (dest / "adapter_config.json").is_file() and not (dest / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_cli_export_without_dest_is_exit_2(study_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from autopeft.cli import main

    assert main(["export", "--study", "sst2", "--out", str(study_dir), "--trial", "0"]) == 2
    assert "destination" in capsys.readouterr().err
