"""Issue "evidence" (sampler efficiency): a tabular benchmark of the `mixed` space on SST-2.

Comparing samplers by running whole searches costs a GPU-day per seed and sampler, and the answer drowns in
training noise. A table of real measurements, each configuration trained once, lets `bench/sampler_efficiency.py`
replay any number of samplers and seeds on the same numbers in minutes on a CPU (the tabular-benchmark method
of NAS-Bench and HPOBench). This script builds that table:

* N distinct configurations of `search_spaces/mixed.yaml` for the backbone's layer count: the head-only point
  (every size 0, every bit off: it sits on every front) first, then seeded random points drawn by
  `autopeft.search.sample_configs`, each new by `spec_key`. The order is prefix-stable: the first N of a
  larger table are the table of N, so `--n` can grow a table with `--resume`.
* Each is trained once at one fidelity (default: the CPU preset of `studies/glue-sst2.yaml`, 2500 examples,
  1 epoch, length 64, batch 32, seed 0) and scored as the search scores it: `select="heldout"` on
  `min(heldout_examples, len(train) // 5)` training examples held out (`autopeft.search.heldout_size`), with
  the dev metric measured beside it, never used to choose.
* Training is `autopeft.packing.train_pack`, `--pack-size` configurations at a time on one shared frozen
  backbone; if a pack raises, its configurations are trained one by one with `run_trial` instead. Each row
  says which (`path`: "pack" or "single"). A packed row's `peak_memory_mb` is the pack module's one-step
  probe of that configuration alone, a single row's the allocator's peak over its whole run (see
  `autopeft.packing`). `--jobs J` shards the packs over J processes, each with its own CUDA context.

Output: `bench/data/tabular-<task>-<backbone>-<fidelity>.jsonl`. The first line is `{"meta": {...}}` (task,
backbone, space, layers, fidelity, held-out size, seed, device, versions, date); then one line per
configuration: `index` (its place in the seeded order), `params` (the Optuna params), `spec`
(`PeftSpec.to_dict()`), `metric` (held-out), `dev_metric`, `trainable_params`, `peak_memory_mb`,
`train_seconds`, ... or `failed`/`detail` for a failed trial. Rows are appended as each pack finishes, so a
run that is cut off keeps everything it finished, and `--resume` trains only what is missing. Rows land in
completion order; `index` gives the seeded order.

    python bench/tabular.py --backbone .carry/minilm-bf16 --data-dir .carry/data --jobs 8   # GPU, 320 configs
    python bench/tabular.py ... --resume                       # finish a table a timeout cut short
    python bench/tabular.py --tiny --n 6                       # CPU smoke test: tiny random BERT, toy data

Also writes bench/results/tabular-<device>-<date>.json (`tabular_tiny-...` for --tiny) with the summary last.
Runs offline (HF_HUB_OFFLINE=1 unless set): the backbone is a local directory or `minilm`, the data `--data-dir`.
`--limit S` stops submitting packs after S seconds, so an outer timeout never cuts a pack in half.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repo, for a checkout without `pip install -e`
from common import device_name, versions, write_results

from autopeft.spec import Fidelity

BENCH = Path(__file__).resolve().parent
#: the meta fields that must agree for --resume to add rows to an existing table
RESUME_KEYS = ("task", "backbone", "space", "num_layers", "fidelity", "heldout_examples", "select")


# ----- the configurations --------------------------------------------------------------------------------------
def head_only_params(distributions: dict[str, Any]) -> dict[str, Any]:
    """Every index at its lowest choice and every bit off: the head-only configuration (all sizes 0)."""
    from optuna.distributions import CategoricalDistribution

    return {name: (d.choices[0] if isinstance(d, CategoricalDistribution) else d.low)
            for name, d in distributions.items()}


def table_configs(space: Any, num_layers: int, n: int, seed: int, tries: int = 1000) -> list[dict[str, Any]]:
    """The head-only point, then seeded random points, each a configuration (spec_key) not drawn before.

    Drawn one point per `sample_configs` call so the sequence is prefix-stable (the first n of any longer
    table); fewer than n only if the space has fewer distinct configurations than `tries` can find. The rng is
    seeded from a string, not the bare seed: a replayed study enqueues `sample_configs(random.Random(seed))` as
    its start points, and with the same stream seed 0's start points would all be table rows exactly.
    """
    from autopeft.search import sample_configs, spec_key

    first = head_only_params(space.distributions(num_layers))
    points = [first]
    seen = {spec_key(space.decode(first, num_layers).to_dict())}
    rng = random.Random(f"autopeft-tabular-{seed}")
    while len(points) < n:
        new = sample_configs(space, num_layers, rng, 1, tries=tries, fits=lambda _spec: True, exclude=seen)
        if not new:
            break
        points.append(new[0])
        seen.add(spec_key(space.decode(new[0], num_layers).to_dict()))
    return points[:n]


def fidelity_tag(fid: Fidelity) -> str:
    """A short file-name tag of what sets a row's numbers: examples, epochs/steps, length, batch, seed."""
    steps = f"s{fid.max_steps}" if fid.max_steps else f"e{fid.epochs:g}"
    n = "all" if fid.train_examples is None else str(fid.train_examples)
    tag = f"n{n}-{steps}-l{fid.max_length}-b{fid.batch_size}"
    return tag + (f"-seed{fid.seed}" if fid.seed else "")


def backbone_short(backbone: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(backbone).rstrip("/")).name).strip("-").lower() or "backbone"


def default_table_path(task: str, backbone: str, fid: Fidelity, out_dir: Path) -> Path:
    return out_dir / f"tabular-{task.replace('/', '-')}-{backbone_short(backbone)}-{fidelity_tag(fid)}.jsonl"


# ----- the table file ----------------------------------------------------------------------------------------
def read_table(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, rows) of a table file; a torn last line (a run killed mid-write) is skipped, not fatal."""
    meta: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "meta" in obj and not meta:
            meta = obj["meta"]
        elif "spec" in obj:
            rows.append(obj)
    return meta, rows


def _append(path: Path, objs: Iterable[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for obj in objs:
            f.write(json.dumps(obj, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----- training (one pack; runs in the main process or in a worker) -------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(task_name: str, data: Any, device: str | None, threads: int | None = None) -> None:
    """Once per worker process: its task data (and, on first use, its CUDA context and token cache).

    `threads` caps torch's CPU threads: J workers each with every core's worth of threads would fight over the
    cores the host-side work (collation, the Python loop that launches kernels) needs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        import torch

        torch.set_num_threads(threads)
    _WORKER.update(task=data.load(task_name), device=device)


def _row(index: int, params: dict[str, Any], spec: dict[str, Any], outcome: Any, path: str) -> dict[str, Any]:
    from autopeft.errors import TrialFailed

    row: dict[str, Any] = {"index": index, "params": params, "spec": spec, "path": path}
    if isinstance(outcome, TrialFailed):
        return row | {"failed": outcome.reason, "detail": str(outcome.detail)[:500],
                      "peak_memory_mb": outcome.memory_mb}
    if isinstance(outcome, BaseException):
        return row | {"failed": "error", "detail": f"{type(outcome).__name__}: {str(outcome)[:480]}"}
    m = outcome.metrics.to_dict()
    keep = ("metric_name", "metric", "dev_metric", "trainable_params", "trainable_pct", "backbone_params",
            "peak_memory_mb", "train_seconds", "eval_seconds", "tokens_per_s", "train_loss", "steps", "extra")
    return row | {k: m[k] for k in keep}


def run_pack(job: dict[str, Any]) -> dict[str, Any]:
    """Train one pack (`job["items"]`: (index, params, spec) triples) and return its rows and stats.

    `train_pack` first; if it raises, or the whole pack runs out of memory, every configuration again with
    `run_trial` (a failure of one is its own row). Never raises: a benchmark run should end with every row it
    could measure.
    """
    import torch

    from autopeft.errors import TrialFailed
    from autopeft.packing import train_pack
    from autopeft.train import run_trial

    task, device = _WORKER["task"], _WORKER["device"]
    items, base = job["items"], job["config"]
    configs = [dataclasses.replace(base, spec=spec) for _, _, spec in items]
    kw = {"task": task, "select": "heldout", "heldout_fraction": job["heldout_fraction"], "device": device,
          "kernel_mode": job["kernel_mode"]}
    t0 = time.perf_counter()
    fallback = None
    try:
        pack = train_pack(configs, **kw)
        if len(configs) > 1 and all(isinstance(r, TrialFailed) and r.reason == "oom" for r in pack.results):
            raise RuntimeError(f"the whole pack ran out of memory ({pack.results[0].detail[:200]})")
        rows = [_row(i, p, s, r, "pack") for (i, p, s), r in zip(items, pack.results, strict=True)]
        stats = dataclasses.asdict(pack.stats)
    except Exception as exc:  # the pack as a whole failed: measure each configuration alone instead
        fallback = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        stats = None
        rows = []
        for (i, p, s), cfg in zip(items, configs, strict=True):
            try:
                outcome: Any = run_trial(cfg, progress=False, **kw)
            except TrialFailed as e:
                outcome = e
            except torch.cuda.OutOfMemoryError as e:
                outcome = TrialFailed("oom", str(e).splitlines()[0] if str(e) else "out of memory")
            except Exception as e:
                outcome = e
            rows.append(_row(i, p, s, outcome, "single"))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return {"rows": rows, "stats": stats, "fallback": fallback, "seconds": time.perf_counter() - t0,
            "pid": os.getpid()}


# ----- main --------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny random BERT, toy data, few steps")
    ap.add_argument("--backbone", default="minilm", help="hub id, local dir, or minilm (the packaged one)")
    ap.add_argument("--task", default="glue/sst2")
    ap.add_argument("--data-dir", default=os.environ.get("AUTOPEFT_DATA_DIR"))
    ap.add_argument("--space", default="mixed")
    ap.add_argument("--n", type=int, default=320, help="distinct configurations (head-only included)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the configurations drawn")
    ap.add_argument("--pack-size", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (each its own CUDA context)")
    ap.add_argument("--train-examples", type=int, default=2500)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batch-size", type=int, default=128)
    ap.add_argument("--train-seed", type=int, default=0, help="the fidelity's seed (data order, init)")
    ap.add_argument("--heldout-examples", type=int, default=500, help="as studies/glue-sst2.yaml")
    ap.add_argument("--kernels", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="the table file (default bench/data/tabular-...jsonl)")
    ap.add_argument("--results", default=str(BENCH / "results"), help="where the summary JSON goes")
    ap.add_argument("--resume", action="store_true", help="keep the file's rows and train only missing configs")
    ap.add_argument("--limit", type=float, default=None,
                    help="seconds: submit no new pack after this long (a clean stop before an outer timeout)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Build (or extend, with --resume) the table; returns its path."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network; every input is local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoConfig

    from autopeft.errors import UserError
    from autopeft.models import resolve_backbone
    from autopeft.search import SearchOptions, heldout_size, spec_key
    from autopeft.space import SearchSpace
    from autopeft.train import DataOptions, TrialConfig, pick_device

    started = time.perf_counter()
    tmp = None
    if args.tiny:
        from packing import tiny_setup  # bench/packing.py: a saved tiny BERT and a toy CSV task

        tmp = Path(tempfile.mkdtemp(prefix="autopeft-bench-tabular-"))
        backbone, data = tiny_setup(tmp)
        task_name, args.device = "file", args.device or "cpu"
        fid = Fidelity(train_examples=None, max_steps=args.max_steps or 4, batch_size=16, max_length=32, lr=1e-3,
                       eval_batch_size=64, seed=args.train_seed)
        short = "tiny-bert"
    else:
        backbone, data, task_name = args.backbone, DataOptions(data_dir=args.data_dir), args.task
        fid = Fidelity(train_examples=args.train_examples, epochs=args.epochs, max_steps=args.max_steps,
                       max_length=args.max_length, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                       seed=args.train_seed)
        short = backbone_short(backbone)
    try:
        device = pick_device(args.device)
        space = SearchSpace.load(args.space)
        num_layers = AutoConfig.from_pretrained(resolve_backbone(backbone)).num_hidden_layers
        task = data.load(task_name)
        held = heldout_size(SearchOptions(task=task_name, heldout_examples=args.heldout_examples), task)
        heldout_fraction = held / len(task.train)
        out = Path(args.out) if args.out else default_table_path(task_name, short, fid, BENCH / "data")
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"task": task_name, "backbone": short, "backbone_path": str(backbone), "space": args.space,
                "num_layers": num_layers, "fidelity": fid.to_dict(), "select": "heldout",
                "heldout_examples": held, "heldout_fraction": heldout_fraction, "train_size": len(task.train),
                "seed": args.seed, "n": args.n, "pack_size": args.pack_size, "jobs": args.jobs,
                "device": device_name(device), "versions": versions(), "date": _dt.date.today().isoformat(),
                "command": " ".join(sys.argv), "tiny": args.tiny}

        configs = table_configs(space, num_layers, args.n, args.seed)
        done: set[str] = set()
        if out.exists() and out.stat().st_size > 0:
            if not args.resume:
                raise UserError(f"{out} exists; pass --resume to add its missing rows, or --out another file")
            old, old_rows = read_table(out)
            clash = [k for k in RESUME_KEYS if old.get(k) != meta[k]]
            if clash:
                raise UserError(f"{out} was built with other {', '.join(clash)}; use --out for a new table")
            done = {spec_key(r["spec"]) for r in old_rows}
            _append(out, [{"meta_resume": {k: meta[k] for k in ("n", "device", "date", "command", "jobs")}}])
        else:
            _append(out, [{"meta": meta}])
        todo = []
        for i, params in enumerate(configs):
            spec = space.decode(params, num_layers).to_dict()
            if spec_key(spec) not in done:
                todo.append((i, params, spec))
        base = TrialConfig(task=task_name, spec={}, backbone=backbone, fidelity=fid, data=data)
        jobs = [{"items": todo[s:s + args.pack_size], "config": base, "heldout_fraction": heldout_fraction,
                 "kernel_mode": args.kernels} for s in range(0, len(todo), max(1, args.pack_size))]
        print(f"{len(configs)} configurations, {len(configs) - len(todo)} already in {out}, {len(todo)} to train "
              f"in {len(jobs)} packs of <= {args.pack_size} on {max(1, args.jobs)} process(es), {device}", flush=True)
        finished = _run_jobs(jobs, args, task_name, data, out, started)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    _, rows = read_table(out)
    _summarise(rows, finished, args, meta, out, time.perf_counter() - started, device)
    return out


def _run_jobs(jobs: list[dict[str, Any]], args: argparse.Namespace, task_name: str, data: Any, out: Path,
              started: float) -> list[dict[str, Any]]:
    """Run the packs (inline, or over --jobs spawned processes) and append each one's rows as it finishes."""
    finished: list[dict[str, Any]] = []

    def record(res: dict[str, Any]) -> None:
        _append(out, res["rows"])
        finished.append({k: v for k, v in res.items() if k != "rows"} | {"size": len(res["rows"])})
        ok = [r for r in res["rows"] if "failed" not in r]
        accs = ", ".join(f"{r['metric']:.3f}" for r in ok)
        how = f"FALLBACK single ({res['fallback']})" if res["fallback"] else "pack"
        print(f"[{time.perf_counter() - started:6.0f}s] {len(finished)}/{len(jobs)} {how}: {len(ok)}/"
              f"{len(res['rows'])} ok in {res['seconds']:.1f}s (pid {res['pid']}); held-out acc {accs}", flush=True)

    def over_time() -> bool:
        return args.limit is not None and time.perf_counter() - started > args.limit

    if max(1, args.jobs) == 1:
        _init_worker(task_name, data, args.device)
        for job in jobs:
            if over_time():
                print(f"--limit {args.limit:g}s reached: stopping with {len(jobs) - len(finished)} packs left",
                      flush=True)
                break
            record(run_pack(job))
        return finished

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(task_name, data, args.device,
                                       max(1, (os.cpu_count() or 1) // args.jobs))) as pool:
        queue = list(jobs)
        running = set()
        while queue or running:  # at most `jobs` packs in flight, so --limit can stop submitting
            while queue and len(running) < args.jobs and not over_time():
                running.add(pool.submit(run_pack, queue.pop(0)))
            if not running:
                print(f"--limit {args.limit:g}s reached: stopping with {len(queue)} packs left", flush=True)
                break
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    record(fut.result())
                except Exception as exc:  # a worker died (BrokenProcessPool): keep what finished
                    print(f"worker error: {type(exc).__name__}: {exc}", flush=True)
    return finished


def _summarise(rows: list[dict[str, Any]], finished: list[dict[str, Any]], args: argparse.Namespace,
               meta: dict[str, Any], out: Path, wall: float, device: Any) -> None:
    ok = [r for r in rows if "failed" not in r]
    packs = [f for f in finished if f["stats"]]
    summary: dict[str, Any] = {
        "rows": len(rows),
        "rows_ok": len(ok),
        "rows_failed": len(rows) - len(ok),
        "rows_this_run": sum(f["size"] for f in finished),
        "wall_seconds": wall,
        "configs_per_hour": 3600.0 * sum(f["size"] for f in finished) / wall if wall > 0 else 0.0,
        "packs_fell_back_to_single": sum(1 for f in finished if f["fallback"]),
        "jobs": args.jobs,
        "pack_size": args.pack_size,
    }
    if ok:
        accs = [r["metric"] for r in ok]
        summary |= {"heldout_acc_max": max(accs), "heldout_acc_median": statistics.median(accs),
                    "heldout_acc_min": min(accs)}
        devs = [r["dev_metric"] for r in ok if r.get("dev_metric") is not None]
        if devs:
            summary["dev_acc_max"] = max(devs)
        summary["log10_params_range"] = [math.log10(max(1, min(r["trainable_params"] for r in ok))),
                                         math.log10(max(1, max(r["trainable_params"] for r in ok)))]
    rates = [f["stats"]["tokens"] / f["stats"]["train_seconds"] for f in packs if f["stats"]["train_seconds"] > 0]
    if rates:
        summary["pack_tokens_per_s_median"] = statistics.median(rates)
    failures: dict[str, int] = {}
    for r in rows:
        if "failed" in r:
            failures[r["failed"]] = failures.get(r["failed"], 0) + 1
    notes = (f"table {out} ({'tiny random BERT, toy data: smoke test, the numbers mean nothing' if args.tiny else ''}"
             f"{meta['backbone']} on {meta['task']}); fidelity {meta['fidelity']}; held-out {meta['heldout_examples']}"
             f" examples of train; configurations seed {meta['seed']}; failures {failures or 'none'}")
    write_results("tabular_tiny" if args.tiny else "tabular", [{"table": str(out), "meta": meta, "packs": finished}],
                  summary, out_dir=args.results, notes=notes, device=device)


if __name__ == "__main__":
    from autopeft.errors import UserError

    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
