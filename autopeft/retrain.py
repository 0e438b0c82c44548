"""`autopeft train`: one configuration from a YAML file, trained and measured, results printed and saved."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from autopeft.config import load_trial_config, trial_config_to_dict
from autopeft.errors import UserError
from autopeft.peft import trainable_state_dict
from autopeft.report import metrics_table
from autopeft.spec import Metrics
from autopeft.train import run_trial
from autopeft.yamlio import dump_yaml


def check_output_dir(output: str | Path | None, force: bool = False) -> None:
    """Refuse a non-empty output dir up front, so a long run never ends in an error or an overwrite."""
    if output is None:
        return
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output directory {out} exists and is not empty; choose a new one or pass --force")


def train_command(config: str, *, fidelity: str = "search", output: str | None = None, data_dir: str | None = None,
                  backbone: str | None = None, device: str | None = None, kernel_mode: str = "auto",
                  force: bool = False, as_json: bool = False) -> Metrics:
    cfg = load_trial_config(config, fidelity=fidelity)
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    if backbone:
        cfg = dataclasses.replace(cfg, backbone=backbone)
    check_output_dir(output, force)
    result = run_trial(cfg, device=device, kernel_mode=kernel_mode, progress=not as_json)
    m = result.metrics
    if output:
        write_run_dir(Path(output), cfg_dict=trial_config_to_dict(cfg, result.spec), metrics=m,
                      weights=trainable_state_dict(result.model))
    if as_json:
        print(json.dumps(m.to_dict(), indent=2))
    else:
        print(metrics_table(m, result.spec.summary()))
        print(json.dumps(m.to_dict()))
    return m


def write_run_dir(out: Path, *, cfg_dict: dict, metrics: Metrics, weights: dict) -> None:
    """Write into a temp dir beside `out`, then rename: an interrupted write leaves no half-made directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        dump_yaml(cfg_dict, tmp / "autopeft.yaml")
        (tmp / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2))
        save_file(weights, str(tmp / "autopeft_weights.safetensors"), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
