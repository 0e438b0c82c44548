"""Issue "scale out": many worker processes on one PostgreSQL study, with a fast stand-in for training.

    python bench/load.py                         # 8 workers, 400 trials, a throwaway local PostgreSQL
    python bench/load.py --storage postgresql+psycopg2://user:pw@host/db --workers 16 --trials 2000

The objective is the only stand-in for training in the project: it suggests two floats and sleeps a few
milliseconds, so what is measured is the storage path every real worker takes (`autopeft.worker.work`:
budget check, ask with heartbeats, tell). Checked afterwards, from the storage: exactly `--trials` COMPLETE
trials, no trial number twice, none left RUNNING or lost, and no storage error in any worker.

Writes bench/results/load-<device>-<date>.json (see DESIGN.md) and prints the summary last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

STUDY = "load"


def fast_objective(sleep_s: float):
    def run(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        y = trial.suggest_int("y", 0, 10)
        time.sleep(sleep_s)
        return x, float(y)

    return run


def worker_main(args: argparse.Namespace) -> int:
    import optuna

    from autopeft.search import open_storage
    from autopeft.worker import Stop, work

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = os.environ["AUTOPEFT_STORAGE"]
    study = optuna.load_study(study_name=STUDY, storage=open_storage(url),
                              sampler=optuna.samplers.RandomSampler(seed=os.getpid()))
    started = time.perf_counter()
    stats = work(study, fast_objective(args.sleep), stop=Stop().install(), echo=lambda s: print(s, file=sys.stderr),
                 poll_s=0.05)
    print(json.dumps({"pid": os.getpid(), "complete": stats.complete, "failed": stats.failed,
                      "surplus": stats.surplus, "storage_errors": stats.storage_errors,
                      "seconds": time.perf_counter() - started}), flush=True)
    return 0


def run_load(url: str, workers: int, trials: int, sleep_s: float) -> tuple[list[dict], dict]:
    """Create the study, run `workers` processes on it, verify from the storage; (rows, summary)."""
    import optuna

    from autopeft.search import open_storage
    from autopeft.worker import SHADOW_ATTR

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(url)
    if STUDY in [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]:
        optuna.delete_study(study_name=STUDY, storage=storage)
    study = optuna.create_study(study_name=STUDY, storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("n_trials", trials)
    env = {**os.environ, "AUTOPEFT_STORAGE": url, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--sleep", str(sleep_s)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    rows, errors = [], 0
    for p, (out, err) in zip(procs, outs):
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        row = lines[-1] if lines else {"pid": p.pid, "storage_errors": 0}
        row["exit_code"] = p.returncode
        if p.returncode != 0:
            row["stderr_tail"] = err[-2000:]
            errors += 1
        errors += int(row.get("storage_errors", 0))
        rows.append(row)
    trials_all = optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    numbers = Counter(t.number for t in trials_all)
    complete = [t for t in trials_all if t.state == optuna.trial.TrialState.COMPLETE
                and SHADOW_ATTR not in t.user_attrs]
    stuck = [t for t in trials_all if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    duplicates = sum(c - 1 for c in numbers.values()) + max(0, len(complete) - trials)
    # throughput of the study itself: first trial started -> last trial finished (process start-up excluded)
    spans = [t for t in trials_all if t.datetime_start and t.datetime_complete]
    span = (max(t.datetime_complete for t in spans) - min(t.datetime_start for t in spans)).total_seconds() \
        if spans else wall
    summary = {
        "trials_per_s": round(len(complete) / max(span, 1e-9), 2),
        "wall_trials_per_s": round(len(complete) / wall, 2),
        "storage_errors": errors,
        "lost_trials": max(0, trials - len(complete)) + len(stuck),
        "duplicate_trials": duplicates,
        "complete_trials": len(complete),
        "surplus_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials_all),
        "failed_trials": sum(t.state == optuna.trial.TrialState.FAIL for t in trials_all),
        "workers": workers,
        "seconds": round(wall, 2),
    }
    return rows, summary


def _write(rows: list[dict], summary: dict, storage_desc: str) -> Path:
    import optuna
    import sqlalchemy

    notes = (f"storage: {storage_desc}; optuna {optuna.__version__}, sqlalchemy {sqlalchemy.__version__}; "
             "trials_per_s spans first trial start to last trial end (worker start-up excluded), "
             "wall_trials_per_s includes it; the objective is a fast stand-in for training")
    try:
        from common import write_results
    except ImportError:  # bench/common.py absent: the same record by hand
        import datetime
        import platform

        date = datetime.date.today().isoformat()
        out = ROOT / "bench" / "results" / f"load-cpu-{date}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"bench": "load", "device": "cpu", "date": date,
                                   "versions": {"python": platform.python_version()},
                                   "command": " ".join(sys.argv), "rows": rows, "summary": summary,
                                   "notes": notes}, indent=2) + "\n")
        print(f"wrote {out}")
        return out
    return write_results("load", rows, summary, out_dir=ROOT / "bench" / "results", notes=notes, device="cpu")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", help="a PostgreSQL URL (default: start a throwaway local server)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--trials", type=int, default=400)
    p.add_argument("--sleep", type=float, default=0.005, help="seconds of the stand-in objective")
    p.add_argument("--no-write", action="store_true", help="print the summary only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)
    from autopeft.search import mask_url

    if args.storage:
        rows, summary = run_load(args.storage, args.workers, args.trials, args.sleep)
        desc = mask_url(args.storage)
    else:
        from tests.postgres import TempPostgres, available

        reason = available()
        if reason:
            print(f"bench/load.py: {reason}; pass --storage URL", file=sys.stderr)
            return 2
        with TempPostgres() as pg:
            rows, summary = run_load(pg.url, args.workers, args.trials, args.sleep)
            version = subprocess.run([__import__("tests.postgres").postgres.find_bin("postgres"), "--version"],
                                     capture_output=True, text=True).stdout.strip()
        desc = f"throwaway local PostgreSQL ({version}), fsync off"
    if not args.no_write:
        _write(rows, summary, desc)
    print(json.dumps(summary))
    ok = summary["storage_errors"] == 0 and summary["lost_trials"] == 0 and summary["duplicate_trials"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
