"""What a finished study measured about itself: trials complete and failed, and its wall clock from the first trial's
start to the last trial's end, as Optuna stored them; trials per hour of that wall clock; and its complete trials by
the number of layers they adapt (how many, how many the sampler chose, median held-out and dev metrics).

The study's own timestamps are the measurement, so this can run anywhere after the fact (the GPU machine's study
file is copied back): `--device` names the machine the study ran on, and the result is dated by the study's first
trial, not by today.

    python bench/study_stats.py bench/data/optuna-glue-sst2-long-h200-2026-11-29.db.gz --study glue-sst2-long \\
        --device h200 --notes "4 workers on one H200, bench/gpu_long_study.sh"

Writes bench/results/study_<study>-<device>-<date>.json and prints the summary last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import optuna

from autopeft.spec import PeftSpec
from autopeft.worker import FAIL_REASON, SHADOW_ATTR


class NoStudy(Exception):
    """The database holds no study of the name asked for."""


def stats(db: str, study_name: str) -> dict:
    """`db`: the study's SQLite file, or that file gzipped (how bench/data keeps the larger ones, so that the tree
    still fits what travels to a GPU machine)."""
    if db.endswith(".gz"):
        import gzip
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / "optuna.db"
            with gzip.open(db, "rb") as src, plain.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            return stats(str(plain), study_name)
    try:
        study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{Path(db).resolve()}")
    except KeyError:  # Optuna's answer for a name the storage does not hold
        raise NoStudy(study_name) from None
    trials = study.get_trials(deepcopy=False)
    start = min(t.datetime_start for t in trials if t.datetime_start)
    end = max(t.datetime_complete for t in trials if t.datetime_complete)
    wall = (end - start).total_seconds()
    # COMPLETE stand-ins of infeasible trials (autopeft.worker.record_infeasible) were never trained: not counted
    shadows = [t for t in trials if SHADOW_ATTR in t.user_attrs]
    trials = [t for t in trials if SHADOW_ATTR not in t.user_attrs]
    by_state = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    feasible = sum(t.state == optuna.trial.TrialState.COMPLETE and "spec" in t.user_attrs
                   and all(c <= 0 for c in t.user_attrs.get("constraints") or []) for t in trials)
    reasons: dict[str, int] = {}
    for t in trials:
        if t.state == optuna.trial.TrialState.FAIL:
            why = str(t.user_attrs.get(FAIL_REASON, "unknown"))
            reasons[why] = reasons.get(why, 0) + 1
    return {"start": start.isoformat(), "end": end.isoformat(), "wall_s": round(wall, 1),
            "trials": {k: v for k, v in by_state.items() if v}, "complete_within_limits": feasible,
            "infeasible_stand_ins": len(shadows), "fail_reasons": reasons,
            "complete_per_hour": round(by_state["complete"] / wall * 3600, 1),
            "by_adapted_layers": by_layers(study, trials)}


def by_layers(study: optuna.Study, trials: list) -> dict[str, dict[str, float]]:
    """Complete trials grouped by how many layers they adapt: how many, how many the sampler chose (after the
    random start points), and their median held-out metric (the study's objective 0) and dev metric. Why: where
    a study spends its trials, and what that costs in accuracy, is what explains a front (README, issue 9)."""
    start = study.user_attrs.get("search_options", {}).get("n_startup_trials", 0)
    groups: dict[int, list] = {}
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE and "spec" in t.user_attrs:
            groups.setdefault(len(PeftSpec.from_dict(t.user_attrs["spec"]).adapted_layers()), []).append(t)
    out = {}
    for n, ts in sorted(groups.items()):
        dev = [t.user_attrs["dev_metric"] for t in ts if t.user_attrs.get("dev_metric") is not None]
        out[str(n)] = {"complete": len(ts), "chosen_by_sampler": sum(t.number >= start for t in ts),
                       "median_heldout": statistics.median(t.values[0] for t in ts),
                       "median_dev": statistics.median(dev) if dev else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db", help="the study's SQLite file (optuna.db), or that file gzipped (.db.gz)")
    ap.add_argument("--study", required=True)
    ap.add_argument("--device", required=True, help="the machine the study ran on, e.g. h200")
    ap.add_argument("--notes", default="")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not Path(args.db).is_file():  # else SQLite would create an empty database there
        ap.error(f"{args.db}: no such file; give the study's optuna.db (or .db.gz)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        row = stats(args.db, args.study)
    except NoStudy:
        ap.error(f"{args.db} holds no study named {args.study!r}; pass the name `autopeft search --study` gave it")
    date = row["start"][:10]
    summary = {"wall_s": row["wall_s"], "complete": row["trials"].get("complete", 0),
               "complete_within_limits": row["complete_within_limits"], "failed": row["trials"].get("fail", 0),
               "complete_per_hour": row["complete_per_hour"]}
    record = {"bench": "study_stats", "device": args.device, "date": date, "versions": None,
              "command": " ".join(sys.argv), "rows": [row], "summary": summary,
              "notes": "from the study's own timestamps (first trial start to last trial end); versions: those of "
                       "the machine that ran it, not of this reader. " + args.notes}
    path = Path(args.out) / f"study_{args.study}-{args.device}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}\nsummary:")
    for k, v in summary.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
