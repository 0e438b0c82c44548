"""How long the BoTorch sampler takes to propose one configuration, against the number of finished trials.

A proposal (GP fit + qLogNEHVI optimisation) is paid before every trial, so it must stay small next to a
trial's training time as a study grows. The history is synthetic (a fast fake objective over mixed.yaml at
6 layers, with a size constraint), so only the sampler is measured.

    python bench/search_overhead.py                       # 20, 50, 100 trials, median of 5 proposals each
    python bench/search_overhead.py --study-out autopeft-runs   # + the service overhead of a finished study

`--study-out DIR` reads a study that `autopeft search` ran (DIR/optuna.db) and splits its wall time into
training + evaluation (measured inside each trial) and everything else: proposals, storage, model loading
and injection, tokenisation, saving weights, MLflow logging and the Pareto report. That "everything else"
over the study's wall time is `overhead_fraction`.

Writes bench/results/search_overhead-<device>-<date>.json (see DESIGN.md) and prints the summary last.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna

from autopeft.sampler import make_sampler
from autopeft.search import spec_key
from autopeft.space import SearchSpace
from autopeft.spec import PeftSpec

DIRECTIONS = ["maximize", "minimize", "minimize"]


def fake(spec: PeftSpec, rng: random.Random) -> tuple[list[float], float]:
    """Accuracy saturating in adapter size (with seed noise), log-size and memory; constraint: size <= 600."""
    size = (sum(sum(r) for r in spec.lora.values()) + sum(spec.serial_adapter) + sum(spec.parallel_adapter)
            + sum(spec.prefix) + 8 * sum(sum(b) for b in spec.ia3.values()) + 16 * sum(spec.bitfit))
    acc = 0.5 + 0.4 * (1 - math.exp(-size / 80)) + rng.gauss(0, 0.01)
    return [acc, math.log10(1 + size), 100 + 0.3 * size + rng.gauss(0, 1)], float(size - 600)


def history(n_trials: int, layers: int, seed: int, batch: int = 1
            ) -> tuple[optuna.Study, SearchSpace, dict, random.Random]:
    """A BoTorch study (the search's sampler) holding `n_trials` finished synthetic trials over mixed.yaml, and
    the space, distributions and RNG to tell it more (`fake`)."""
    space = SearchSpace.load("mixed")
    dists = space.distributions(layers)
    rng = random.Random(seed)
    study = optuna.create_study(directions=DIRECTIONS,
                                sampler=make_sampler("botorch", seed, 6, constraints=True, n_objectives=3,
                                                     batch=batch, canonical=lambda p: spec_key(
                                                         space.decode(p, layers).to_dict())))
    for _ in range(n_trials):
        params = space.random_params(rng, layers)
        values, con = fake(space.decode(params, layers), rng)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=values,
                                                  user_attrs={"constraints": [con]},
                                                  system_attrs={"constraints": [con]}))
    return study, space, dists, rng


def measure(n_trials: int, proposals: int, layers: int, seed: int, batch: int = 1) -> dict:
    """`proposals` GP fits after `n_trials` finished trials. With `batch` > 1 each fit proposes a q-batch; the
    asks that take its queued configurations are timed too, so `per_trial_s` is the cost a trial pays."""
    study, space, dists, rng = history(n_trials, layers, seed, batch)
    seconds, asks = [], []
    for _ in range(proposals * batch):
        started = time.perf_counter()
        trial = study.ask(dists)  # sample_relative: the GP fit and acquisition optimisation happen here
        took = time.perf_counter() - started
        asks.append(took)
        if "autopeft.batch_of" not in trial.user_attrs:  # a fit, not a queued configuration of the last one
            seconds.append(took)
        values, con = fake(space.decode(trial.params, layers), rng)
        trial.set_user_attr("constraints", [con])
        study.tell(trial, values)
    return {"completed_trials": n_trials, "dims": len(dists), "proposals": len(seconds), "batch": batch,
            "median_s": statistics.median(seconds), "max_s": max(seconds), "all_s": [round(s, 3) for s in seconds],
            "per_trial_s": sum(asks) / len(asks)}


def study_overhead(out_dir: str, study_name: str | None) -> dict:
    """Wall time of a finished study vs. the training + evaluation seconds its trials measured."""
    storage = f"sqlite:///{Path(out_dir).resolve() / 'optuna.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    study = optuna.load_study(study_name=study_name or names[0], storage=storage)
    # repeats (autopeft.duplicate_of) carry their twin's numbers but trained nothing: their time is overhead
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and "train_seconds" in t.user_attrs and "autopeft.duplicate_of" not in t.user_attrs]
    repeats = sum("autopeft.duplicate_of" in t.user_attrs for t in study.trials)
    if not done:
        raise SystemExit(f"no complete trials with measurements in {storage}")
    start = min(t.datetime_start for t in study.trials if t.datetime_start)
    end = max(t.datetime_complete for t in study.trials if t.datetime_complete)
    wall = (end - start).total_seconds()
    work = sum(t.user_attrs["train_seconds"] + t.user_attrs.get("eval_seconds", 0.0) for t in done)
    in_trial = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    return {"study": study.study_name, "complete_trials": len(done), "repeats": repeats, "wall_s": round(wall, 1),
            "train_eval_s": round(work, 1), "in_trial_overhead_s": round(in_trial - work, 1),
            "between_trials_s": round(wall - in_trial, 1), "overhead_fraction": round(1 - work / wall, 4),
            "mean_trial_s": round(in_trial / len(done), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, nargs="+", default=[20, 50, 100])
    ap.add_argument("--proposals", type=int, default=5)
    ap.add_argument("--study-out", help="--out dir of a finished `autopeft search` (adds overhead_fraction)")
    ap.add_argument("--study", help="study name in that dir (default: the first)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--proposal-batch", type=int, nargs="+", default=[1, 6],
                    help="q-batches per GP fit to time: 1 (one configuration per fit) and the presets' 6")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    rows = []
    for q in args.proposal_batch:
        for n in args.trials:
            row = measure(n, args.proposals, args.layers, args.seed, q)
            rows.append(row)
            print(f"{n:4d} completed trials, {row['dims']} dims: median {row['median_s']:.2f}s, "
                  f"max {row['max_s']:.2f}s per fit (a q-batch of {row['batch']}), "
                  f"{row['per_trial_s']:.2f}s per trial", flush=True)
    # proposal_s_at_N: one fit proposing one configuration; _qK: one fit proposing a q-batch of K, and the
    # seconds per trial when its K configurations are asked one after another
    summary: dict[str, float] = {}
    for r in rows:
        suffix = "" if r["batch"] == 1 else f"_q{r['batch']}"
        summary[f"proposal_s_at_{r['completed_trials']}{suffix}"] = round(r["median_s"], 3)
        summary[f"proposal_s_per_trial_at_{r['completed_trials']}{suffix}"] = round(r["per_trial_s"], 3)
    notes = ("BoTorch qLogNEHVI proposal time on a synthetic history over mixed.yaml; CPU, one thread; "
             f"median of {args.proposals} GP fits per row; a fit with q-batch K proposes K configurations, the "
             "next K-1 asks take them from the queue (proposal_s_per_trial_at_N_qK averages all asks)")
    if args.study_out:
        row = study_overhead(args.study_out, args.study)
        rows.append(row)
        summary["overhead_fraction"] = row["overhead_fraction"]
        notes += (f"; overhead_fraction from study {row['study']} ({row['complete_trials']} complete trials, "
                  f"{row['wall_s']} s wall): 1 - (train + eval seconds) / wall")
        print(f"study {row['study']}: {row}", flush=True)
    try:
        from common import write_results
    except ImportError:  # a checkout without bench/common.py: print only
        print("summary:", summary)
        return
    write_results("search_overhead", rows, summary, out_dir=args.out, device="cpu", notes=notes)


if __name__ == "__main__":
    main()
