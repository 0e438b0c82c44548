"""`autopeft train` as a user runs it: output, saved run dir, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autopeft.cli import main
from tests.test_train import write_sentiment_csv


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cli-toy")
    return write_sentiment_csv(d / "train.csv", 200, 0), write_sentiment_csv(d / "dev.csv", 60, 1)


def write_config(path: Path, backbone: Path, files: tuple[Path, Path], /, **changes: object) -> Path:
    cfg = {"task": "file", "backbone": str(backbone), "spec": {"lora": {"rank": {"q": 4, "v": 4}}},
           "fidelity": {"max_steps": 3, "batch_size": 8, "max_length": 32},
           "data": {"train_file": str(files[0]), "dev_file": str(files[1]), "text_column": "review",
                    "label_column": "label"}}
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_prints_table_and_json_and_saves(tmp_path: Path, tiny_backbone_dir: Path, toy_files, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_backbone_dir, toy_files)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "trainable params" in text and "peak memory" in text and "tokens/s" in text
    metrics = json.loads(text.strip().splitlines()[-1])
    assert metrics["metric_name"] == "accuracy" and metrics["steps"] == 3
    assert sorted(p.name for p in out.iterdir()) == [  # the export layout (LoRA: HF PEFT and AdapterHub too)
        "README.md", "adapter_config.json", "adapter_model.safetensors", "adapterhub", "autopeft.yaml",
        "autopeft_weights.safetensors", "metrics.json"]
    saved = yaml.safe_load((out / "autopeft.yaml").read_text())
    assert saved["spec"]["lora"]["rank"]["q"] == [4, 4]
    # the saved config trains again as is
    assert main(["train", "--config", str(out / "autopeft.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == metrics["trainable_params"]


def test_train_full_fidelity_writes_the_export_layout(tmp_path: Path, tiny_backbone_dir: Path, toy_files,
                                                      capsys) -> None:
    """`autopeft train --config EXPORT/autopeft.yaml --fidelity full --output DIR`: the whole train set, >= 3
    epochs, no step cap; DIR loads with HF PEFT and autopeft.load to the same logits."""
    import peft
    import torch

    import autopeft
    from autopeft.models import load_backbone

    config = write_config(tmp_path / "c.yaml", tiny_backbone_dir, toy_files,
                          spec={"dora": {"rank": {"q": [4, 0], "v": 2}}})
    out = tmp_path / "full"
    assert main(["train", "--config", str(config), "--fidelity", "full", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrote hf-peft" in text and "wrote autopeft" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fidelity"] == "full" and metrics["trained_fidelity"]["train_examples"] is None
    assert metrics["steps"] == 3 * 200 // 8  # 200 examples, batch 8, 3 epochs: max_steps 3 is dropped
    saved = yaml.safe_load((out / "autopeft.yaml").read_text())
    assert saved["fidelity"]["max_steps"] == 3 and saved["full_fidelity"]["epochs"] == 3.0  # retrains the same
    assert "--fidelity full" in (out / "README.md").read_text()
    base, tokenizer = load_backbone(str(tiny_backbone_dir), 2)
    enc = dict(tokenizer(["a fine film", "awful"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        hf = peft.PeftModel.from_pretrained(base, str(out)).eval()(**enc).logits
        ours = autopeft.load(None, out)(**enc).logits
    assert (hf - ours).abs().max().item() <= 1e-4


def test_output_dir_not_empty_is_refused_before_training(tmp_path: Path, tiny_backbone_dir: Path, toy_files,
                                                         capsys) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_backbone_dir, toy_files)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["train", "--config", str(config), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


BAD = {
    "unknown task": ({"task": "glue/sst3"}, "glue/sst2"),
    "unknown method": ({"spec": {"loha": {"rank": 4}}}, "unknown method"),
    "negative rank": ({"spec": {"lora": {"rank": {"q": -2}}}}, "negative"),
    "layer beyond depth": ({"spec": {"lora": {"rank": {"q": {9: 4}}}}}, "beyond the model's depth"),
    "unknown backbone": ({"backbone": "no-such-org/no-such-model"}, "unknown backbone"),
    "missing spec": ({"spec": None}, "missing 'spec'"),
    "bad cuda_graphs": ({"fidelity": {"max_steps": 3, "cuda_graphs": "sometimes"}},
                        "fidelity.cuda_graphs must be auto, on or off"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_clear_line_exit_2(case: str, tmp_path: Path, tiny_backbone_dir: Path, toy_files,
                                            capsys) -> None:
    changes, needle = BAD[case]
    config = write_config(tmp_path / "c.yaml", tiny_backbone_dir, toy_files, **changes)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("autopeft: error:") and needle in err, err


def test_cuda_graphs_flag(tmp_path: Path, tiny_backbone_dir: Path, toy_files, capsys) -> None:
    """--cuda-graphs overrides the config's fidelity.cuda_graphs; "on" without CUDA is one line, exit 2, before
    anything trains; YAML's bare `off` (a boolean to YAML) is read as "off"."""
    config = write_config(tmp_path / "c.yaml", tiny_backbone_dir, toy_files)
    assert main(["train", "--config", str(config), "--device", "cpu", "--cuda-graphs", "on"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cuda-graphs on needs a CUDA device" in err, err
    with pytest.raises(SystemExit) as bad:
        main(["train", "--config", str(config), "--cuda-graphs", "sometimes"])
    assert bad.value.code == 2 and "invalid choice" in capsys.readouterr().err
    off = tmp_path / "off.yaml"
    off.write_text(config.read_text().replace("max_steps: 3", "max_steps: 3\n  cuda_graphs: off"))
    assert yaml.safe_load(off.read_text())["fidelity"]["cuda_graphs"] is False
    assert main(["train", "--config", str(off), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3


def test_bad_data_is_one_clear_line_exit_2(tmp_path: Path, tiny_backbone_dir: Path, toy_files, capsys) -> None:
    missing = write_config(tmp_path / "m.yaml", tiny_backbone_dir, toy_files,
                           data={"train_file": str(tmp_path / "nope.csv"), "dev_file": str(toy_files[1]),
                                 "text_column": "review", "label_column": "label"})
    assert main(["train", "--config", str(missing)]) == 2
    assert "nope.csv" in capsys.readouterr().err
    no_label = write_config(tmp_path / "l.yaml", tiny_backbone_dir, toy_files,
                            data={"train_file": str(toy_files[0]), "dev_file": str(toy_files[1]),
                                  "text_column": "review", "label_column": "stars"})
    assert main(["train", "--config", str(no_label)]) == 2
    assert "stars" in capsys.readouterr().err


def test_malformed_yaml_names_the_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: glue/sst2\nspec: {lora: [\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "line" in capsys.readouterr().err


def test_console_script_runs(tmp_path: Path) -> None:
    """The installed `autopeft` entry point works and reports bad input with exit code 2."""
    exe = Path(sys.executable).parent / "autopeft"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "autopeft"]
    help_out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0 and "train" in help_out.stdout
    bad = subprocess.run([*cmd, "train", "--config", str(tmp_path / "none.yaml")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
