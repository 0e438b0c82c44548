"""`autopeft train`: one configuration from a YAML file, trained and measured, results printed and saved.

With `--output DIR` the trained model is written in the export layout (`autopeft.export.export_model`):
`autopeft.yaml`, `autopeft_weights.safetensors`, `metrics.json`, `README.md`, and an HF PEFT adapter where HF
PEFT can express the spec, so a retrained export is used exactly like the one `autopeft export` wrote.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autopeft.config import trial_config_from_dict, trial_config_to_dict
from autopeft.cuda_graphs import use_cuda_graphs
from autopeft.errors import UserError
from autopeft.report import metrics_table
from autopeft.spec import Metrics
from autopeft.train import TrialConfig, pick_device, run_trial
from autopeft.yamlio import load_yaml


def check_output_dir(output: str | Path | None, force: bool = False) -> None:
    """Refuse a non-empty output dir up front, so a long run never ends in an error or an overwrite."""
    if output is None:
        return
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output directory {out} exists and is not empty; choose a new one or pass --force")


def _override(cfg: TrialConfig, data_dir: str | None, backbone: str | None,
              cuda_graphs: str | None = None) -> TrialConfig:
    if cuda_graphs:
        cfg = dataclasses.replace(cfg, fidelity=dataclasses.replace(cfg.fidelity, cuda_graphs=cuda_graphs))
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    if backbone:
        cfg = dataclasses.replace(cfg, backbone=backbone)
    return cfg


def export_config(raw: Mapping[str, Any], search_cfg: TrialConfig, spec: Any) -> dict[str, Any]:
    """The `autopeft.yaml` of a retrained run: the search fidelity and `full_fidelity` of the source config (so
    the file retrains the same way again), with the overrides given on the command line applied."""
    out = trial_config_to_dict(search_cfg, spec)
    if raw.get("full_fidelity"):
        out["full_fidelity"] = dict(raw["full_fidelity"])
    return out


def train_command(config: str, *, fidelity: str = "search", output: str | None = None, data_dir: str | None = None,
                  backbone: str | None = None, device: str | None = None, kernel_mode: str = "auto",
                  force: bool = False, as_json: bool = False, cuda_graphs: str | None = None) -> Metrics:
    raw = load_yaml(config, "config")
    cfg = _override(trial_config_from_dict(raw, fidelity=fidelity, source=str(config)), data_dir, backbone,
                    cuda_graphs)
    search_cfg = _override(trial_config_from_dict(raw, fidelity="search", source=str(config)), data_dir, backbone,
                           cuda_graphs)
    check_output_dir(output, force)
    use_cuda_graphs(cfg.fidelity.cuda_graphs, pick_device(device))  # "on" without CUDA: exit 2 before training
    result = run_trial(cfg, device=device, kernel_mode=kernel_mode, progress=not as_json)
    m = result.metrics
    report = None
    if output:
        from autopeft.export import export_model

        report = export_model(result.model, result.spec, output, trial_config=export_config(raw, search_cfg,
                                                                                             result.spec),
                              metrics={**m.to_dict(), "fidelity": fidelity, "trained_fidelity": cfg.fidelity.to_dict()},
                              force=force, source=f"autopeft train --config {config} --fidelity {fidelity}")
    if as_json:
        print(json.dumps(m.to_dict(), indent=2))
    else:
        print(metrics_table(m, result.spec.summary()))
        if report is not None:
            print("\n".join(report.lines()))
        print(json.dumps(m.to_dict()))
    return m
