"""Issue "evidence" (sampler efficiency): how many trials BoTorch needs to reach the front random search reaches.

Replays each sampler (botorch, random, tpe, nsga2; `autopeft.sampler.make_sampler`, the study's own
settings) over the tabular benchmark `bench/tabular.py` builds: for each (sampler, seed) an in-memory Optuna
study over the `mixed` space runs `--trials` trials whose objective *looks the proposal up* in the table
instead of training it.

The lookup, and why: a proposal is mapped to the NEAREST tabulated configuration. Both the proposal and the
table's params are first made canonical (`space.encode(space.decode(params))`: settings the configuration
cannot read, such as sizes when every layer bit is off, go to their canonical value), so a proposal whose
configuration is in the table hits exactly that row (distance 0). Otherwise the distance is Euclidean on the
normalised per-dimension index encoding the samplers themselves see: an integer index (ladder rung or bit)
as (index - low) / (high - low) in [0, 1], a categorical as a one-hot scaled so that two different choices
are at distance 1; ties go to the row drawn first. This makes comparisons cheap (a replay of 60 trials costs
only the sampler's own proposals) and exact on real measurements: every value a sampler is told was
measured on the GPU, none is predicted by a surrogate model, and every sampler is judged on the same numbers.
The price is resolution: the table holds a few hundred of the space's ~10^19 configurations, so a sampler is
rewarded for steering towards good regions, not for pinpointing a configuration the table does not hold.

What each trial returns is the hit row's objectives, with the directions of `autopeft.search`'s study:
held-out metric (maximise), log10 trainable parameters (minimise), peak memory MiB (minimise). A failed row
fails the trial, as in a search. As in `autopeft.search`, the study starts with `n_startup_trials` seeded
random points enqueued (`sample_configs`, the study seed), and a proposal whose configuration a completed trial
already had gets that trial's values and enqueues one fresh random configuration (`fresh_point`'s rule).

Hypervolume: of the table rows hit so far, after every trial, by `autopeft.pareto.hypervolume` (Optuna's
exact algorithm). Fixed normalisation from the whole table, the same for every run: each objective, as a loss
(-metric, log10 params, memory), is min-max scaled over the table's successful rows to [0, 1], and the
reference point is 1.1 in each (10% beyond the table's worst value). The table's own hypervolume is the most
any run can reach (reported as `table_hv`).

Summary: `<sampler>_final_hv_median` (and IQR) at `--trials`; `random<T>_hv_median`, the target: the median
over seeds of random search's hypervolume at T trials; `<sampler>_trials_to_random<T>_hv`, the median over
that sampler's seeds of the first trial count whose hypervolume reaches the target (null when the median
seed never does within T; `..._seeds_reached` says how many did). With the defaults the headline key is
`botorch_trials_to_random60_hv`.

    python bench/sampler_efficiency.py --table bench/data/tabular-glue-sst2-minilm-bf16-n2500-e1-l64-b32.jsonl \
        --jobs 4                                  # 4 samplers x 5 seeds x 60 trials, CPU only
    python bench/sampler_efficiency.py --table T.jsonl --trials 12 --seeds 2   # smoke run

Writes bench/results/sampler_efficiency-<device>-<date>.json and a PNG beside it (median line and IQR band
of hypervolume against trials, per sampler), and prints the summary last.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repo, for a checkout without `pip install -e`
from common import device_name, write_results
from tabular import read_table

BENCH = Path(__file__).resolve().parent
SAMPLERS = ("botorch", "random", "tpe", "nsga2")
DIRECTIONS = ("maximize", "minimize", "minimize")  # metric, log10 params, memory: as autopeft.search.OBJECTIVES
REF = 1.1  # reference point in every normalised loss dimension


class TabulatedFailure(Exception):
    """The nearest row is a failed trial: the replayed trial fails too (Optuna records it as FAIL)."""


# ----- pure pieces (tested without a table) --------------------------------------------------------------------
def encode_params(params: Mapping[str, Any], distributions: Mapping[str, Any]) -> np.ndarray:
    """The normalised per-dimension encoding the nearest-row distance is taken on (module docstring)."""
    from optuna.distributions import CategoricalDistribution

    out: list[float] = []
    for name, d in distributions.items():
        v = params[name]
        if isinstance(d, CategoricalDistribution):
            out.extend(math.sqrt(0.5) * float(v == c) for c in d.choices)
        else:
            lo, hi = float(d.low), float(d.high)
            if getattr(d, "log", False):
                lo, hi, v = math.log(lo), math.log(hi), math.log(v)
            out.append(0.0 if hi == lo else (float(v) - lo) / (hi - lo))
    return np.asarray(out, dtype=float)


def nearest(table_x: np.ndarray, x: np.ndarray) -> int:
    """Index of the row of `table_x` nearest to `x` (Euclidean); the first of equally near rows."""
    return int(np.argmin(((table_x - x[None, :]) ** 2).sum(axis=1)))


def normalise(losses: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    span = np.where(hi > lo, hi - lo, 1.0)
    return (losses - lo) / span


def hv_curve(points: np.ndarray, hits: Sequence[int | None]) -> list[float]:
    """Hypervolume (normalised losses, reference `REF`) of the rows hit by trials 1..t, for every t.

    `points` are the table's normalised losses (NaN for failed rows); `hits` the row of each trial in order
    (None or a failed row adds nothing).
    """
    from autopeft.pareto import hypervolume

    seen: list[int] = []
    curve: list[float] = []
    hv = 0.0
    for i in hits:
        if i is not None and i not in seen and np.all(np.isfinite(points[i])):
            seen.append(i)
            hv = hypervolume(points[seen], [REF] * points.shape[1], ["minimize"] * points.shape[1])
        curve.append(hv)
    return curve


def trials_to_target(curve: Sequence[float], target: float) -> int | None:
    """The first trial count (1-based) whose hypervolume reaches `target`; None if none within the curve."""
    for t, hv in enumerate(curve, start=1):
        if hv >= target:
            return t
    return None


def median_or_none(values: Sequence[int | float | None]) -> float | None:
    """Median where None means "not within the budget" (larger than any number); None if the median is."""
    if not values:
        return None
    med = float(np.median([math.inf if v is None else float(v) for v in values]))
    return None if math.isinf(med) else med


def quantiles(curves: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr = np.asarray(curves, dtype=float)
    return np.quantile(arr, 0.5, axis=0), np.quantile(arr, 0.25, axis=0), np.quantile(arr, 0.75, axis=0)


# ----- the table ---------------------------------------------------------------------------------------------
@dataclass
class Table:
    """A tabular benchmark ready for lookups: canonical encodings, objectives, normalised losses."""

    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    space: Any
    num_layers: int
    distributions: dict[str, Any]
    x: np.ndarray  # canonical encodings, one row per table row
    keys: dict[str, int]  # spec_key -> row
    objectives: np.ndarray  # metric, log10 params, memory (NaN for failed rows)
    points: np.ndarray  # normalised losses for the hypervolume (NaN for failed rows)
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def load(cls, path: str | Path) -> Table:
        from autopeft.search import spec_key
        from autopeft.space import SearchSpace

        meta, raw = read_table(path)
        if not raw:
            raise SystemExit(f"{path}: no rows")
        space = SearchSpace.load(meta.get("space", "mixed"))
        num_layers = int(meta.get("num_layers") or next(iter(raw))["spec"]["num_layers"])
        dists = space.distributions(num_layers)
        rows, keys = [], {}
        for r in sorted(raw, key=lambda r: r.get("index", 0)):
            k = spec_key(r["spec"])
            if k not in keys:
                keys[k] = len(rows)
                rows.append(r)
        x = np.stack([encode_params(canonical(space, r["params"], num_layers), dists) for r in rows])
        obj = np.full((len(rows), 3), np.nan)
        for i, r in enumerate(rows):
            if "failed" not in r and r.get("metric") is not None:
                obj[i] = [r["metric"], math.log10(max(1, r["trainable_params"])), r["peak_memory_mb"]]
        loss = obj * np.array([-1.0, 1.0, 1.0])
        ok = np.all(np.isfinite(loss), axis=1)
        if not ok.any():
            raise SystemExit(f"{path}: every row failed")
        lo, hi = loss[ok].min(axis=0), loss[ok].max(axis=0)
        return cls(meta, rows, space, num_layers, dists, x, keys, obj, normalise(loss, lo, hi), lo, hi)

    def lookup(self, params: Mapping[str, Any]) -> int:
        """The row of `params`'s configuration if tabulated, else the nearest row (module docstring)."""
        from autopeft.search import spec_key

        spec = self.space.decode(params, self.num_layers).to_dict()
        hit = self.keys.get(spec_key(spec))
        if hit is not None:
            return hit
        return nearest(self.x, encode_params(canonical(self.space, params, self.num_layers), self.distributions))

    def table_hv(self) -> float:
        from autopeft.pareto import hypervolume

        ok = np.all(np.isfinite(self.points), axis=1)
        return hypervolume(self.points[ok], [REF] * 3, ["minimize"] * 3)


def canonical(space: Any, params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The canonical params of `params`'s configuration (unreadable settings at their canonical value)."""
    return space.encode(space.decode(params, num_layers), num_layers)


# ----- one replay ------------------------------------------------------------------------------------------------
#: autopeft.sampler's BoTorch budget constants that `--botorch NAME=VALUE` may change for an experiment
BOTORCH_SETTINGS = ("MC_SAMPLES", "RAW_SAMPLES", "NUM_RESTARTS", "MAX_BASELINE", "MAX_ITER", "FIT_MAXITER",
                    "DISCRETE_POOL", "GREEDY_POOL")


def botorch_settings(pairs: Sequence[str]) -> dict[str, int]:
    """`NAME=VALUE` pairs as a dict, refused early when a name is not one of BOTORCH_SETTINGS."""
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in BOTORCH_SETTINGS or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--botorch {pair!r}: use NAME=N with N >= 1 and NAME one of "
                             f"{', '.join(BOTORCH_SETTINGS)}")
        out[name] = int(value)
    return out


def replay(table: Table, sampler: str, seed: int, trials: int, n_startup: int, batch: int = 4,
           settings: Mapping[str, int] | None = None) -> dict[str, Any]:
    """One (sampler, seed) study of `trials` trials on the table: the row each trial hit and the HV curve.
    `settings` overrides autopeft.sampler's BoTorch budget (module constants) in this process."""
    import optuna

    from autopeft import sampler as sampler_module
    from autopeft.sampler import make_sampler

    for name, value in (settings or {}).items():
        setattr(sampler_module, name, value)
    from autopeft.search import room_left, sample_configs, spec_key, suggest_all

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # a table whose metric barely varies (the tiny smoke table) makes BoTorch warn on every proposal
    warnings.filterwarnings("ignore", message=r"Data \(outcome observations\) is not standardized")
    space, layers = table.space, table.num_layers

    def key(params: Mapping[str, Any]) -> str:
        return spec_key(space.decode(params, layers).to_dict())

    study = optuna.create_study(directions=list(DIRECTIONS), sampler=make_sampler(
        sampler, seed=seed, n_startup_trials=n_startup, constraints=False, n_objectives=3, canonical=key,
        batch=batch, room=lambda s: room_left(s, trials)))  # as the search: no proposal past the budget
    # as autopeft.search.prepare: the study's seeded random start points, enqueued for every sampler
    for p in sample_configs(space, layers, random.Random(seed), n_startup,
                            tries=200 * max(1, n_startup), fits=lambda _s: True):
        study.enqueue_trial(p, skip_if_exists=True)
    hits: list[int | None] = []
    completed: set[str] = set()
    known: set[str] = set()
    duplicates = 0

    def objective(trial: optuna.Trial) -> list[float]:
        nonlocal duplicates
        params = suggest_all(trial, table.distributions)
        k = key(params)
        if k in completed:  # as autopeft.search: reuse the twin's values, enqueue one fresh configuration
            duplicates += 1
            fresh = sample_configs(space, layers, random.Random(seed * 100_003 + trial.number), 1, tries=200,
                                   fits=lambda _s: True, exclude=known | {k})
            if fresh:
                trial.study.enqueue_trial(fresh[0], skip_if_exists=True)
        known.add(k)
        row = table.lookup(params)
        hits.append(row)
        values = table.objectives[row]
        if not np.all(np.isfinite(values)):
            raise TabulatedFailure(table.rows[row].get("failed", "failed"))
        completed.add(k)
        return [float(v) for v in values]

    t0 = time.perf_counter()
    study.optimize(objective, n_trials=trials, catch=(TabulatedFailure,))
    curve = hv_curve(table.points, hits)
    return {"sampler": sampler, "seed": seed, "hits": hits, "hv": curve, "final_hv": curve[-1] if curve else 0.0,
            "unique_rows": len(set(hits)), "duplicates": duplicates,
            "failed": sum(1 for h in hits if not np.all(np.isfinite(table.objectives[h]))),
            "seconds": time.perf_counter() - t0}


def _replay_job(table_path: str, sampler: str, seed: int, trials: int, n_startup: int, batch: int,
                settings: Mapping[str, int]) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return replay(Table.load(table_path), sampler, seed, trials, n_startup, batch, settings)


# ----- main --------------------------------------------------------------------------------------------------
def latest_table() -> Path | None:
    tables = sorted((BENCH / "data").glob("tabular-*.jsonl"), key=lambda p: p.stat().st_mtime)
    return tables[-1] if tables else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=None, help="a bench/tabular.py table (default: the newest in bench/data)")
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per sampler")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--n-startup-trials", type=int, default=8, help="as studies/glue-sst2.yaml")
    ap.add_argument("--proposal-batch", type=int, default=6, help="BoTorch q-batch, as studies/glue-sst2.yaml")
    ap.add_argument("--jobs", type=int, default=1, help="(sampler, seed) replays in parallel processes")
    ap.add_argument("--botorch", nargs="+", default=[], metavar="NAME=N",
                    help="change the BoTorch budget for this replay (e.g. MC_SAMPLES=32 RAW_SAMPLES=128); the "
                         "results file is then named sampler_efficiency_<NAME>N_...")
    ap.add_argument("--out", default=str(BENCH / "results"))
    args = ap.parse_args(argv)
    try:
        botorch_settings(args.botorch)
    except SystemExit as exc:  # a bad --botorch: argparse's one-line error and exit code 2, before any replay
        ap.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Replay every (sampler, seed), write the results JSON and the plot; returns the summary."""
    args = parse_args(argv)
    settings = botorch_settings(args.botorch)
    path = Path(args.table) if args.table else latest_table()
    if path is None or not path.is_file():
        raise SystemExit(f"no table {path or 'in bench/data'}: build one with bench/tabular.py")
    table = Table.load(path)
    n_ok = int(np.all(np.isfinite(table.objectives), axis=1).sum())
    print(f"table {path}: {len(table.rows)} configurations ({n_ok} measured), {table.num_layers} layers; "
          f"{len(args.samplers)} samplers x {args.seeds} seeds x {args.trials} trials", flush=True)
    pairs = [(s, seed) for s in args.samplers for seed in range(args.seeds)]
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def done(r: dict[str, Any]) -> None:
        runs.append(r)
        print(f"[{time.perf_counter() - t0:6.0f}s] {r['sampler']:8s} seed {r['seed']}: final HV {r['final_hv']:.4f}, "
              f"{r['unique_rows']} rows hit, {r['duplicates']} repeats, {r['seconds']:.0f}s", flush=True)

    if args.jobs <= 1:
        for s, seed in pairs:
            done(replay(table, s, seed, args.trials, args.n_startup_trials, args.proposal_batch, settings))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_replay_job, str(path), s, seed, args.trials, args.n_startup_trials,
                                   args.proposal_batch, settings)
                       for s, seed in pairs]
            for fut in as_completed(futures):
                done(fut.result())
    runs.sort(key=lambda r: (args.samplers.index(r["sampler"]), r["seed"]))
    summary, curves = summarise(runs, args.samplers, args.trials, table.table_hv())
    summary["n_startup_trials"] = args.n_startup_trials
    summary["table_rows"] = len(table.rows)
    summary["table_rows_measured"] = n_ok
    rows: list[dict[str, Any]] = [
        {"sampler": s, "trial": t + 1, "hv_median": med[t], "hv_q25": q25[t], "hv_q75": q75[t]}
        for s, (med, q25, q75) in curves.items() for t in range(args.trials)]
    rows += [{k: v for k, v in r.items()} | {"kind": "run"} for r in runs]
    device = device_name()
    name = "sampler_efficiency" + "".join(f"_{k.lower()}{v}" for k, v in settings.items())
    png = Path(args.out) / f"{name}-{device}-{_dt.date.today().isoformat()}.png"
    plot(curves, summary, table, png, args.trials)
    m = table.meta
    notes = (f"table {path} ({m.get('backbone')} on {m.get('task')}, {m.get('device')}, {m.get('date')}, fidelity "
             f"{m.get('fidelity')}, held-out {m.get('heldout_examples')}); lookup: exact configuration, else nearest "
             f"row on the canonical normalised index encoding; HV of hit rows on losses (-metric, log10 params, "
             f"memory MiB) min-max normalised over the table's measured rows, reference {REF} per dimension "
             f"(table_hv = the table's own HV); n_startup_trials {args.n_startup_trials} enqueued seeded points; "
             f"BoTorch proposal batch {args.proposal_batch}; "
             f"BoTorch budget {', '.join(f'{k}={v}' for k, v in settings.items()) or 'as autopeft.sampler'}; "
             f"seeds 0..{args.seeds - 1}; plot {png}")
    write_results(name, rows, summary, out_dir=args.out, notes=notes, device=device)
    return summary


def summarise(runs: Sequence[Mapping[str, Any]], samplers: Sequence[str], trials: int, table_hv: float
              ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Summary keys (module docstring) and each sampler's (median, q25, q75) curve."""
    by = {s: [r for r in runs if r["sampler"] == s] for s in samplers}
    curves = {s: quantiles([r["hv"] for r in rs]) for s, rs in by.items() if rs}
    summary: dict[str, Any] = {"table_hv": table_hv, "trials": trials, "seeds": max((len(v) for v in by.values()),
                                                                                     default=0)}
    for s, (med, q25, q75) in curves.items():
        summary[f"{s}_final_hv_median"] = float(med[-1])
        summary[f"{s}_final_hv_iqr"] = float(q75[-1] - q25[-1])
        summary[f"{s}_final_hv_frac_of_table"] = float(med[-1]) / table_hv if table_hv > 0 else None
    if by.get("random"):
        target = float(np.median([r["hv"][-1] for r in by["random"]]))
        summary[f"random{trials}_hv_median"] = target
        for s, rs in by.items():
            if s == "random" or not rs:
                continue
            reached = [trials_to_target(r["hv"], target) for r in rs]
            summary[f"{s}_trials_to_random{trials}_hv"] = median_or_none(reached)
            summary[f"{s}_trials_to_random{trials}_hv_seeds_reached"] = sum(v is not None for v in reached)
    return summary, curves


def plot(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], summary: Mapping[str, Any], table: Table,
         png: Path, trials: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(1, trials + 1)
    for s, (med, q25, q75) in curves.items():
        (line,) = ax.plot(x, med, label=s, lw=2)
        ax.fill_between(x, q25, q75, color=line.get_color(), alpha=0.2, lw=0)
    startup = summary.get("n_startup_trials")
    if startup:
        ax.axvline(startup + 0.5, color="grey", ls="-.", lw=1, label=f"{startup} enqueued start points (shared)")
    ax.axhline(summary["table_hv"], color="grey", ls=":", lw=1, label="whole table")
    target = summary.get(f"random{trials}_hv_median")
    if target is not None:
        ax.axhline(target, color="black", ls="--", lw=1, label=f"random @ {trials} (median)")
    m = table.meta
    ax.set_title(f"{m.get('space', 'mixed')} space, {m.get('backbone')} on {m.get('task')}: "
                 f"{len(table.rows)}-config table", fontsize=10)
    ax.set_xlabel("trials")
    ax.set_ylabel(f"hypervolume (normalised losses, ref {REF})")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
