"""The trial config file (`autopeft train --config`): task, backbone, spec, fidelity, data source.

`autopeft export` writes the same layout, so a configuration found by a search is retrained with the
command a user would type anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from autopeft.errors import UserError
from autopeft.spec import Fidelity, PeftSpec
from autopeft.train import DataOptions, TrialConfig
from autopeft.yamlio import load_yaml

_KEYS = {"task", "backbone", "spec", "fidelity", "full_fidelity", "data"}


#: the fewest epochs `--fidelity full` trains when the config names no `full_fidelity`
FULL_MIN_EPOCHS = 3.0


def full_fidelity(search: Fidelity) -> Fidelity:
    """`--fidelity full` without a `full_fidelity` in the config: the search's settings (length, batch, lr, seed)
    on the whole train set, for max(3, epochs) epochs, with no step cap."""
    return dataclasses.replace(search, train_examples=None, max_steps=None,
                               epochs=max(float(search.epochs), FULL_MIN_EPOCHS))


def trial_config_from_dict(d: Mapping[str, Any], *, fidelity: str = "search", source: str = "config") -> TrialConfig:
    """Build a `TrialConfig`; `fidelity="full"` uses `full_fidelity`, or the whole train set if absent."""
    if not isinstance(d, Mapping):
        raise UserError(f"{source}: expected a mapping with keys {', '.join(sorted(_KEYS))}")
    unknown = sorted(set(d) - _KEYS)
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    if "task" not in d:
        raise UserError(f"{source}: missing 'task' (e.g. task: glue/sst2)")
    if "spec" not in d:
        raise UserError(f"{source}: missing 'spec' (e.g. spec: {{lora: {{rank: {{q: 8, v: 8}}}}}})")
    fid = Fidelity.from_dict(d.get("fidelity"))
    if fidelity == "full":
        full = d.get("full_fidelity")
        fid = Fidelity.from_dict(full) if full else full_fidelity(fid)
    elif fidelity != "search":
        raise UserError(f"--fidelity must be 'search' or 'full', not {fidelity!r}")
    data = d.get("data") or {}
    allowed = {f.name for f in dataclasses.fields(DataOptions)}
    if not isinstance(data, Mapping) or set(data) - allowed:
        raise UserError(f"{source}: data: takes {', '.join(sorted(allowed))}")
    spec = d["spec"]
    if isinstance(spec, Mapping) and spec.get("num_layers"):
        spec = PeftSpec.from_dict(spec)
    return TrialConfig(task=str(d["task"]), spec=spec, backbone=str(d.get("backbone", "minilm")),
                       fidelity=fid, data=DataOptions(**data))


def load_trial_config(path: str | Path, *, fidelity: str = "search") -> TrialConfig:
    return trial_config_from_dict(load_yaml(path, "config"), fidelity=fidelity, source=str(path))


def trial_config_to_dict(cfg: TrialConfig, spec: PeftSpec | None = None) -> dict[str, Any]:
    spec = spec or cfg.spec
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if v not in (None, False)}
    out: dict[str, Any] = {
        "task": cfg.task,
        "backbone": cfg.backbone,
        "spec": spec.to_dict() if isinstance(spec, PeftSpec) else dict(spec),
        "fidelity": cfg.fidelity.to_dict(),
    }
    if data:
        out["data"] = data
    return out
