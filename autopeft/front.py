"""`autopeft front`: the Pareto front of a study, as a table or JSON, read straight from its storage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

from autopeft.errors import UserError
from autopeft.report import fmt_params, table
from autopeft.search import mask_url, open_storage, spec_key


def resolve_storage(out: str | None, storage: str | None) -> str:
    if storage:
        return storage
    db = Path(out or "autopeft-runs") / "optuna.db"
    if not db.is_file():
        raise UserError(f"no study database at {db}; pass --out DIR of an earlier search, or --storage URL")
    return f"sqlite:///{db.resolve()}"


def load_existing_study(name: str, url: str) -> optuna.Study:
    storage = open_storage(url, heartbeat=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise UserError(f"no study named {name!r} in {mask_url(url)}; studies there: {known}")
    return optuna.load_study(study_name=name, storage=storage)


def front_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One dict per front trial (fewest parameters first): what `front --json` prints and exports pick from."""
    from autopeft.pareto import front_trials

    rows: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    for t in sorted(front_trials(study), key=lambda t: t.number):
        a = t.user_attrs
        key = spec_key(a.get("spec"))
        if key in seen:  # the same configuration proposed again: one row, naming its repeats
            seen[key]["same_as"].append(t.number)
            continue
        rows.append({
            "trial": t.number,
            "metric_name": a.get("metric_name"),
            "metric": a.get("metric"),
            "dev_metric": a.get("dev_metric"),
            "params": a.get("trainable_params"),
            "params_pct": a.get("trainable_pct"),
            "memory_mb": a.get("peak_memory_mb"),
            "train_seconds": a.get("train_seconds"),
            "spec_summary": a.get("spec_summary"),
            "spec": a.get("spec"),
            "same_as": [],
        })
        seen[key] = rows[-1]
    return sorted(rows, key=lambda r: (r["params"] or 0, -(r["metric"] or 0)))


def format_front(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no completed feasible trials yet"
    name = rows[0]["metric_name"] or "metric"
    body = [(_trial_label(r), f"{r['metric']:.4f}", f"{r['dev_metric']:.4f}" if r["dev_metric"] is not None else "-",
             fmt_params(r["params"]), f"{r['params_pct']:.3f}%", f"{r['memory_mb']:.0f}", r["spec_summary"])
            for r in rows]
    return table(body, ("trial", f"{name} (held-out)", f"dev {name}", "params", "% backbone", "MiB", "spec"),
                 left=(0, 6))


def _trial_label(row: dict[str, Any]) -> str:
    same = row.get("same_as") or []
    return f"{row['trial']} (= {', '.join(map(str, same))})" if same else str(row["trial"])


def front_command(study: str, *, out: str | None = None, storage: str | None = None, as_json: bool = False) -> None:
    rows = front_rows(load_existing_study(study, resolve_storage(out, storage)))
    print(json.dumps(rows, indent=2) if as_json else format_front(rows))
