"""The AdapterHub export (`autopeft.export_adapterhub`): the real `adapters` library loads it and computes our
logits, and what it would compute differently is not written.

The round trips run the user's own calls (`adapters.init(model)`, `model.load_adapter(DIR, use_safetensors=True)`,
`set_active_adapters`) in the side environment `make adapters-env` builds (adapters 1.3 + transformers 4.57 in
.venv-adapters, .venv's torch), one subprocess for every case (tests/adapterhub_side.py), and hold its logits to
ours within 1e-4 (fp32). Adapter weights are randomised first (tests.test_load.randomize), so a tensor that did
not load, or landed transposed or in the wrong layer, cannot hide behind a zero init; one case writes a
deliberately wrong config to show the comparison can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autopeft.errors import UserError
from autopeft.export import export_model
from autopeft.export_adapterhub import ADAPTERHUB_DIR, ADAPTERS_VERSION, reduction_factor
from autopeft.peft import inject
from autopeft.spec import PeftSpec
from tests.conftest import REPO, SHARED_DATA, tiny_model
from tests.test_load import TRIAL_CONFIG, batch, logits, randomize, trained

SIDE_ENV = REPO / ".venv-adapters"
SIDE_SCRIPT = Path(__file__).with_name("adapterhub_side.py")

#: name: (family, spec, the AdapterHub method label's parts); heterogeneous wherever adapters can say so
CASES = {
    "serial-pfeiffer": ("bert", {"serial_adapter": {"size": [8, 0, 4]}}, ["serial", "output_adapter"]),
    # 3 does not divide 32: the reduction factor must still floor to it
    "serial-houlsby-gelu": ("bert", {"serial_adapter": {"size": [4, 3, 0], "position": "houlsby",
                                                        "activation": "gelu"}}, ["Houlsby"]),
    "parallel": ("bert", {"parallel_adapter": {"size": [0, 8, 5], "scale": 2}}, ["parallel", "scaling 2"]),
    "prefix": ("bert", {"prefix": {"length": [3, 0, 3], "gate": False}}, ["prefix-tuning", "length 3"]),
    "lora-layers": ("bert", {"lora": {"rank": {"q": [4, 0, 4], "v": [4, 0, 4], "ffn_out": [4, 0, 4]},
                                      "alpha_ratio": 2.0}}, ["LoRA", "r=4", "alpha=8"]),
    "lora-rslora": ("bert", {"lora": {"rank": {"k": 2, "ffn_in": 2}, "rslora": True}}, ["LoRA", "r=2"]),
    "ia3": ("bert", {"ia3": {"k": [1, 1, 0], "v": [1, 1, 0], "ffn_in": [1, 1, 0]}}, ["IA3"]),
    "mixed-serial-parallel-prefix-lora": (
        "bert", {"serial_adapter": {"size": [0, 6, 0], "activation": "tanh"}, "parallel_adapter": {"size": [4, 0, 4]},
                 "prefix": {"length": [2, 2, 0], "gate": False}, "lora": {"rank": {"q": 2}}},
        ["serial", "parallel", "prefix", "LoRA"]),
    "mixed-houlsby-parallel-ia3": (
        "bert", {"serial_adapter": {"size": [0, 4, 4], "position": "houlsby", "activation": "silu"},
                 "parallel_adapter": {"size": [8, 0, 0], "scale": 0.5}, "ia3": ["v", "ffn_in"]},
        ["Houlsby", "parallel", "IA3"]),
    "roberta-mixed": ("roberta", {"serial_adapter": {"size": [4, 0, 0]}, "parallel_adapter": {"size": [0, 4, 8]},
                                  "prefix": {"length": 2, "gate": False}}, ["serial", "parallel", "prefix"]),
    "xlm-roberta-mixed": ("xlm-roberta", {"serial_adapter": {"size": [0, 8, 8], "position": "houlsby"},
                                          "lora": {"rank": {"v": 4, "ffn_in": 4}}}, ["Houlsby", "LoRA"]),
    "electra-mixed": ("electra", {"parallel_adapter": {"size": 4, "scale": 1.0}, "ia3": ["k", "q"],
                                  "prefix": {"length": [0, 3, 3], "gate": False}}, ["parallel", "IA3", "prefix"]),
}


#: the other BERT-family model types adapters adapts with its BERT mixins (RoBERTa's positions start after pad)
OTHER_FAMILIES = {"roberta": {"pad_token_id": 1, "max_position_embeddings": 130},
                  "xlm-roberta": {"pad_token_id": 1, "max_position_embeddings": 130},
                  "electra": {"embedding_size": 32, "max_position_embeddings": 128}}


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    if family not in OTHER_FAMILIES:
        return tiny_model(family, seed=seed)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=1100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **OTHER_FAMILIES[family])
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()


def build(family: str, spec_dict: dict) -> tuple[torch.nn.Module, PeftSpec]:
    """Injected and randomised; IA3 scales spread over 0.25..1.75, so that IA3 alone moves the logits by far
    more than the 1e-4 the round trip allows (near-1 scales on a tiny random model move them by ~1e-4)."""
    if family == "bert":
        model, spec = trained(family, spec_dict)
    else:
        model = tiny(family)
        spec = PeftSpec.from_dict(spec_dict, num_layers=3)
        inject(model, spec)
        randomize(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("autopeft_ia3"):
                p.copy_(0.25 + 1.5 * torch.rand(p.shape, generator=g))
    return model.eval(), spec


def with_our_head(family: str, model: torch.nn.Module) -> torch.nn.Module:
    """The bare backbone carrying the trained head: what the logits would be if no adapter loaded."""
    base = tiny(family)
    base.classifier.load_state_dict(model.classifier.state_dict())
    return base


def side_env_missing() -> str | None:
    if not (SIDE_ENV / "adapters" / "__init__.py").is_file():
        return (f"the AdapterHub side environment is not built ({SIDE_ENV} holds no `adapters`): run "
                "`make adapters-env` (make test builds it)")
    return None


def run_side(jobs: list[dict], work: Path) -> list[dict]:
    """Run tests/adapterhub_side.py on `jobs` in the side environment; its per-job report."""
    (work / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SIDE_ENV), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SIDE_SCRIPT), str(work / "jobs.json")], env=env, cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the adapters side run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_inputs(inputs: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in inputs.items()}, str(path))


def read_logits(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["logits"]


def minilm_sst2(work: Path) -> tuple[dict, dict]:
    """The packaged MiniLM with a mixed spec on 64 SST-2 dev sentences: our result and the side job for it."""
    import csv

    from autopeft.models import load_backbone, packaged_minilm

    with open(SHARED_DATA / "glue" / "sst2" / "dev.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:64]
    model, tokenizer = load_backbone("minilm", 2)
    spec = PeftSpec.from_dict({"serial_adapter": {"size": [0, 0, 0, 16, 16, 8]},
                               "parallel_adapter": {"size": [8, 8, 24, 0, 0, 0], "scale": 2.0},
                               "prefix": {"length": [4, 0, 4, 4, 0, 0], "gate": False},
                               "lora": {"rank": {"q": 4, "v": 4}}}, num_layers=6)
    inject(model, spec)
    randomize(model, seed=7)
    model.eval()
    enc = dict(tokenizer([r["sentence"] for r in rows], padding=True, truncation=True, max_length=64,
                         return_tensors="pt"))
    bare_model = load_backbone("minilm", 2)[0].eval()
    bare_model.classifier.load_state_dict(model.classifier.state_dict())
    bare, logits_of = logits(bare_model, enc), logits(model, enc)
    report = export_model(model, spec, work / "minilm", trial_config=TRIAL_CONFIG, metrics=None)
    save_inputs(enc, work / "minilm-inputs.safetensors")
    job = {"base": str(packaged_minilm()), "adapter": str(work / "minilm" / ADAPTERHUB_DIR),
           "inputs": str(work / "minilm-inputs.safetensors"), "out": str(work / "minilm.logits.safetensors")}
    labels = torch.tensor([int(r["label"]) for r in rows])
    return {"ours": logits_of, "bare": bare, "report": report, "labels": labels}, job


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every case exported, loaded by adapters in one side run: name -> ours, theirs, the bare logits, report."""
    reason = side_env_missing()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("adapterhub")
    inputs = batch()
    save_inputs(inputs, work / "inputs.safetensors")
    bases: dict[str, Path] = {}
    jobs, results = [], {}
    for name, (family, spec_dict, _) in CASES.items():
        if family not in bases:
            bases[family] = work / f"base-{family}"
            tiny(family).save_pretrained(bases[family])
        model, spec = build(family, spec_dict)
        report = export_model(model, spec, work / name, trial_config=TRIAL_CONFIG, metrics=None, formats="adapters")
        results[name] = {"ours": logits(model, inputs), "bare": logits(with_our_head(family, model), inputs),
                         "report": report}
        jobs.append({"base": str(bases[family]), "adapter": str(work / name / ADAPTERHUB_DIR),
                     "inputs": str(work / "inputs.safetensors"), "out": str(work / f"{name}.logits.safetensors")})
    # the same parallel adapter with adapters' default scaling (4) instead of ours (2): must NOT match
    wrong = work / "parallel-wrong-scaling"
    (wrong / ADAPTERHUB_DIR).mkdir(parents=True)
    for f in (work / "parallel" / ADAPTERHUB_DIR).iterdir():
        (wrong / ADAPTERHUB_DIR / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((wrong / ADAPTERHUB_DIR / "adapter_config.json").read_text())
    cfg["config"]["scaling"] = 4.0
    (wrong / ADAPTERHUB_DIR / "adapter_config.json").write_text(json.dumps(cfg))
    results["parallel-wrong-scaling"] = results["parallel"]
    jobs.append({**jobs[list(CASES).index("parallel")], "adapter": str(wrong / ADAPTERHUB_DIR),
                 "out": str(work / "wrong.logits.safetensors")})
    if (SHARED_DATA / "glue" / "sst2" / "dev.tsv").is_file():
        results["minilm-sst2"], job = minilm_sst2(work)
        jobs.append(job)
    for (name, result), job, side in zip(results.items(), jobs, run_side(jobs, work)):
        results[name] = {**result, "theirs": read_logits(job["out"]), "side": side}
    return results


@pytest.mark.slow  # the module's one side run (~25 s on 2 cores: adapters imports in ~8 s) lands on the first
@pytest.mark.parametrize("case", list(CASES))
def test_adapters_library_computes_our_logits(case: str, round_trips: dict[str, dict]) -> None:
    r = round_trips[case]
    side, report = r["side"], r["report"]
    assert side["adapters"] == ADAPTERS_VERSION and side["transformers"].startswith("4.57")
    assert side["name"] == "autopeft" and side["unexpected"] == []
    # prefix-tuning's pool is registered under every layer too; the file holds it once, at the model's pool
    assert [k for k in side["missing"] if ".prefix_tuning.pool.prefix_tunings." not in k] == []
    diff = (r["ours"] - r["theirs"]).abs().max().item()
    assert diff <= 1e-4, f"{case}: max abs diff {diff:.3g}"
    assert (r["bare"] - r["ours"]).abs().max().item() > 1e-3  # the adapter moves the logits, 10x the tolerance
    assert all(part in report.adapters_method for part in CASES[case][2]), report.adapters_method
    assert report.written["adapters"] == [f"{ADAPTERHUB_DIR}/{f}" for f in (
        "adapter_config.json", "adapter.safetensors", "head_config.json", "model_head.safetensors")]


@pytest.mark.slow
def test_a_wrong_config_is_caught(round_trips: dict[str, dict]) -> None:
    """The comparison can fail: adapters' default parallel scaling (4) instead of the spec's (2)."""
    r = round_trips["parallel-wrong-scaling"]
    assert (r["ours"] - r["theirs"]).abs().max().item() > 1e-3


@pytest.mark.slow
def test_minilm_on_sst2_dev(round_trips: dict[str, dict]) -> None:
    """The packaged MiniLM (6 layers, 384 wide) with a mixed spec on SST-2 dev sentences: adapters gives our
    logits, and so our accuracy."""
    if "minilm-sst2" not in round_trips:
        pytest.skip(f"GLUE data not found at {SHARED_DATA} (CI checks the repo out with ../shared beside it)")
    r = round_trips["minilm-sst2"]
    assert r["side"]["unexpected"] == [] and r["side"]["name"] == "autopeft"
    assert "adapters" in r["report"].written and "hf-peft" not in r["report"].written
    diff = (r["ours"] - r["theirs"]).abs().max().item()
    assert diff <= 1e-4, f"max abs diff {diff:.3g}"
    assert (r["bare"] - r["ours"]).abs().max().item() > 1e-3
    labels = r["labels"]
    assert (r["theirs"].argmax(-1) == labels).float().mean() == (r["ours"].argmax(-1) == labels).float().mean()


# ----- what is not written, and why (no side environment needed) --------------------------------------------
@pytest.mark.parametrize(("family", "spec_dict", "why"), [
    ("bert", {"dora": {"rank": {"q": 4}}}, "||W + BA|| without the LoRA scaling"),
    ("bert", {"bitfit": True}, "no BitFit"),
    ("bert", {"prefix": {"length": 3, "gate": True}}, "per-head gate"),
    ("bert", {"prefix": {"length": [3, 0, 2], "gate": False}}, "one prefix_length"),
    ("bert", {"serial_adapter": 4, "parallel_adapter": {"size": [0, 4, 0]}}, "share layer(s) [1]"),
    ("bert", {"lora": {"rank": {"q": 4}}, "ia3": ["v"]}, "one of those per adapter"),
    ("bert", {"lora": {"rank": {"q": 4, "o": 4}}}, "LoRA on o"),
    ("bert", {"lora": {"rank": {"q": [4, 2, 4]}}}, "ranks differ"),
    ("bert", {"lora": {"rank": {"q": [4, 4, 0], "v": [0, 4, 0]}}}, "different modules in different layers"),
    ("bert", {"ia3": ["k", "ffn_out"]}, "IA3 on ffn_out"),
    ("bert", {}, "only the task head"),
    ("llama", {"serial_adapter": 4}, "BERT-family"),
])
def test_inexpressible_specs_skip_adapters_with_a_reason(family: str, spec_dict: dict, why: str,
                                                         tmp_path: Path) -> None:
    model, spec = trained(family, spec_dict)
    report = export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None)
    assert "adapters" not in report.written and why in report.skipped["adapters"], report.skipped["adapters"]
    assert report.skipped["adapters"].endswith("use autopeft.load")
    assert not (tmp_path / "out" / ADAPTERHUB_DIR).exists()
    assert f"not written adapters: {report.skipped['adapters']}" in "\n".join(report.lines())
    with pytest.raises(UserError, match="cannot write the AdapterHub `adapters` format"):
        export_model(model, spec, tmp_path / "ah", trial_config=TRIAL_CONFIG, metrics=None, formats="adapters")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing of the refused export is left


def test_every_reason_is_given(tmp_path: Path) -> None:
    model, spec = trained("bert", {"dora": {"rank": {"q": 4}}, "bitfit": True, "prefix": {"length": [2, 0, 3]}})
    why = export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None).skipped["adapters"]
    assert "BitFit" in why and "DoRA" in why and "per-head gate" in why


def test_layout_config_and_keys(tmp_path: Path) -> None:
    """What a reader of the files sees: the ConfigUnion, per-layer sizes and leave_out, names and shapes."""
    from safetensors.torch import load_file

    model, spec = trained("bert", CASES["mixed-serial-parallel-prefix-lora"][1])
    report = export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None)
    root = tmp_path / "out" / ADAPTERHUB_DIR
    assert sorted(p.name for p in root.iterdir()) == ["adapter.safetensors", "adapter_config.json",
                                                      "head_config.json", "model_head.safetensors"]
    cfg = json.loads((root / "adapter_config.json").read_text())
    assert cfg["name"] == "autopeft" and cfg["version"] == f"adapters.{ADAPTERS_VERSION}"
    assert cfg["model_class"] == "BertForSequenceClassification" and cfg["model_type"] == "bert"
    serial, parallel, prefix, lora = cfg["config"]["configs"]
    assert cfg["config"]["architecture"] == "union"
    assert serial["leave_out"] == [0, 2] and int(32 // serial["reduction_factor"]) == 6 and not serial["is_parallel"]
    assert serial["original_ln_before"] is False and serial["non_linearity"] == "tanh"
    assert parallel["is_parallel"] and parallel["scaling"] == 4.0 and parallel["leave_out"] == [1]
    assert prefix["flat"] and prefix["prefix_length"] == 2 and prefix["leave_out"] == [2]
    assert lora["r"] == 2 and lora["attn_matrices"] == ["q"] and lora["leave_out"] == []
    assert not lora["intermediate_lora"] and not lora["output_lora"]
    tensors = load_file(str(root / "adapter.safetensors"))
    layer = "bert.encoder.layer"
    assert tensors[f"{layer}.1.output.adapters.autopeft.adapter_down.0.weight"].shape == (6, 32)
    assert tensors[f"{layer}.2.output.adapters.autopeft.adapter_up.weight"].shape == (32, 4)
    assert tensors[f"{layer}.0.attention.self.query.loras.autopeft.lora_B"].shape == (32, 2)
    control = tensors["bert.prefix_tuning.prefix_tunings.autopeft.self_prefix.control_trans"]
    assert control.shape == (2 * 2 * 2 * 4 * 8,)  # length x 2 (k, v) x layers x heads x head_dim
    k1 = model.bert.encoder.layer[1].attention.self.autopeft_prefix.key  # the 2nd prefixed layer's keys
    assert torch.equal(control.view(2, 4, 4, 8)[:, 2].transpose(0, 1), k1.detach())
    head = load_file(str(root / "model_head.safetensors"))
    assert torch.equal(head["classifier.weight"], model.classifier.weight.detach())
    head_cfg = json.loads((root / "head_config.json").read_text())
    assert head_cfg["model_class"] == "BertForSequenceClassification" and head_cfg["num_labels"] == 2
    assert "wrote adapters" in "\n".join(report.lines()) and "use_safetensors=True" in "\n".join(report.lines())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Load with AdapterHub `adapters`" in card
    assert 'load_adapter("out/adapterhub", use_safetensors=True)' in card


def test_a_failure_while_writing_it_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autopeft.export_adapterhub import AdapterHubAdapter

    def half_written(self: AdapterHubAdapter, root: Path) -> None:
        (root / ADAPTERHUB_DIR).mkdir()
        (root / ADAPTERHUB_DIR / "adapter_config.json").write_text("{}")
        raise OSError("disk full")

    model, spec = trained("bert", {"parallel_adapter": 4})
    monkeypatch.setattr(AdapterHubAdapter, "write", half_written)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, spec, tmp_path / "a" / "out", trial_config=TRIAL_CONFIG, metrics=None)
    assert list(tmp_path.iterdir()) == []


def test_formats_autopeft_skips_it(tmp_path: Path) -> None:
    model, spec = trained("bert", {"serial_adapter": 4})
    report = export_model(model, spec, tmp_path / "out", trial_config=TRIAL_CONFIG, metrics=None, formats="autopeft")
    assert report.skipped["adapters"] == "not requested (formats='autopeft')"
    assert not (tmp_path / "out" / ADAPTERHUB_DIR).exists()


@pytest.mark.parametrize("hidden", [32, 384, 768, 1000, 1024])
def test_reduction_factor_floors_to_every_size(hidden: int) -> None:
    """adapters sizes a bottleneck as int(hidden // reduction_factor): every size must come back exactly."""
    for size in range(1, 2 * hidden + 1):
        assert int(hidden // reduction_factor(hidden, size)) == size


def test_side_env_pins_are_the_ones_checked() -> None:
    """The Makefile builds the side environment at the adapters version the mapping follows."""
    makefile = (REPO / "Makefile").read_text()
    assert f'"adapters=={ADAPTERS_VERSION.rsplit(".", 1)[0]}.*"' in makefile
