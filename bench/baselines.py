"""Issue "evidence": the PEFT configurations people use today against the autopeft front, on SST-2.

Every row is trained by the same loop (`autopeft.train.train_and_evaluate`: AdamW, warm-up + linear decay,
bf16 autocast on GPU, length-bucketed batches) at one final fidelity, so the only difference between rows is
the configuration. HF PEFT trains its own methods (LoRA, IA3, prefix); full fine-tuning is plain
transformers; Houlsby and Pfeiffer adapters are ours (HF PEFT has no bottleneck adapters). The autopeft rows
are the front points of a finished study (`--study/--storage`), retrained with `run_trial(select="dev")`
at the same fidelity and seeds: the study chose them on a held-out split of train, never on dev.

    python bench/baselines.py --storage sqlite:///runs/optuna.db --study glue-sst2 --seeds 0 1 2

`--rescore N` first trains the study's N best front points under `--front-max-pct` again at the study's own
fidelity and held-out size, with the seeds of `--rescore-seeds` (a seed also draws the split), and ranks them
by the mean held-out metric of those runs and the study's own. Why: a search trial is one seed at a low
fidelity, and the front's order then owes much to luck (on 2026-11-30 the study's best held-out points,
89.0-90.2, retrained to 87.3-87.7 and one configuration's seeds spread by up to 2.3 points). Choosing what to
retrain on the mean of a few cheap runs costs little next to the full-fidelity retraining. Dev is still never
used to choose.

`--study A B` (one storage for all, or one `--storage` per study) retrains several studies into one table, e.g.
one study per parameter budget (`autopeft search --objectives metric --max-params 16898` for the best
configuration within IA3's size beside one within 1%): a user who needs a point under a budget asks for it, and
the dominance count is then over every study's points. Rows are named autopeft_STUDY_trialN.

Writes bench/results/baselines-<device>-<date>.json and prints the summary last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

from autopeft.models import load_backbone, resolve_backbone
from autopeft.spec import Fidelity
from autopeft.train import DataOptions, TrialConfig, pick_device, run_trial, train_and_evaluate

#: HF PEFT baselines: name -> (peft config factory or None for full FT, learning rate)
HF_LR = {"full_ft": 5e-5, "hf_lora_r8_qv": 1e-3, "hf_lora_r8_all": 1e-3, "hf_ia3": 3e-3, "hf_prefix20": 1e-2}
#: ours where HF PEFT has no such method; AdapterHub's default reduction factor 16 -> size hidden/16
OURS = {"ours_houlsby": ("houlsby", 1e-3), "ours_pfeiffer": ("pfeiffer", 1e-3)}


def hf_config(name: str) -> Any:
    import peft

    if name == "hf_lora_r8_qv":
        return peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=["query", "value"])
    if name == "hf_lora_r8_all":
        return peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules="all-linear")
    if name == "hf_ia3":
        return peft.IA3Config(task_type="SEQ_CLS")
    if name == "hf_prefix20":
        return peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20)
    return None


def run_hf(name: str, base: TrialConfig, task: Any, device: Any) -> dict[str, Any]:
    import peft
    import torch

    fid = dataclasses.replace(base.fidelity, lr=HF_LR[name])
    torch.manual_seed(fid.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load_backbone(base.backbone, task.num_labels, dtype=dtype)
    backbone_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
    cfg = hf_config(name)
    if cfg is None:  # full fine-tuning: every weight trains (in fp32: the loop upcasts trainable tensors)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = peft.get_peft_model(model, cfg)
    metrics, _ = train_and_evaluate(model, tok, task, fid, backbone_params=backbone_params,
                                    cache_tag=(resolve_backbone(base.backbone), task.name, task.source),
                                    label=name, device=device, progress=False)
    return metrics.to_dict()


def run_ours(spec: dict, lr: float | None, base: TrialConfig, task: Any, device: Any) -> dict[str, Any]:
    """`lr=None` keeps the per-method learning rates the search trained front points with."""
    cfg = dataclasses.replace(base, spec=spec, fidelity=dataclasses.replace(base.fidelity, lr=lr))
    return run_trial(cfg, task=task, device=str(device), progress=False).metrics.to_dict()


def ranked_front(storage: str, study: str, ranking: dict[int, float] | None = None) -> list[Any]:
    """The study's Pareto front, best held-out metric first, each configuration once; `ranking` (trial number ->
    rescored mean held-out metric, see --rescore) replaces the study's own value for the trials it holds."""
    import optuna
    from optuna.trial import TrialState

    from autopeft.pareto import front_trials, is_feasible

    loaded = optuna.load_study(study_name=study, storage=storage)
    if len(loaded.directions) == 1:
        # one objective (`--objectives metric`, best accuracy under --max-params): its front is the single best
        # trial, but what to rescore and retrain are the best few, so every feasible complete trial is ranked
        front = [t for t in loaded.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)]
    else:
        front = front_trials(loaded)
    ranked = sorted(front, key=lambda t: -(ranking or {}).get(t.number, t.values[0]))
    # one configuration once: a study that proposed it twice has two front points of one spec (the front table's
    # "165 (= 186)"), and rescoring or retraining both would spend the runs on one configuration
    seen: set[str] = set()
    unique = []
    for t in ranked:
        key = json.dumps(t.user_attrs.get("spec"), sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


def under_pct(trials: list[Any], max_pct: float | None) -> list[Any]:
    """The trials with at most `max_pct` % of the backbone's params trainable (all of them for None)."""
    return [t for t in trials if max_pct is None or t.user_attrs.get("trainable_pct", 100.0) <= max_pct]


def point_name(number: int, study: str | None = None, kind: str = "autopeft") -> str:
    """A front point's row name. The study is named only when several studies are retrained in one table
    (`--study A B`): their trial numbers collide."""
    return f"{kind}_{study}_trial{number}" if study else f"{kind}_trial{number}"


def front_specs(storage: str, study: str, top: int, max_pct: float | None,
                budgets: dict[str, int] | None = None, ranking: dict[int, float] | None = None,
                label: str | None = None) -> list[tuple[str, dict]]:
    """Which front points to retrain: the `top` best held-out metrics under `max_pct` % of params (then the
    rest of the front), plus, for each baseline in `budgets` (name -> its trainable params), the front point
    with the best held-out metric that has no more params than that baseline: the one that could dominate it.
    `ranking`: as in `ranked_front`; `label`: as in `point_name`."""
    front = ranked_front(storage, study, ranking)
    small = under_pct(front, max_pct)
    rest = [t for t in front if t not in small]
    chosen = (small + rest)[:top]
    for params in (budgets or {}).values():
        under = [t for t in front if t.user_attrs.get("trainable_params", math.inf) <= params]
        if under and under[0] not in chosen:
            chosen.append(under[0])
    return [(point_name(t.number, label), t.user_attrs["spec"]) for t in chosen]


def rescore_candidates(storage: str, study: str, n: int, max_pct: float | None) -> list[tuple[int, dict, float]]:
    """The study's `n` best front points under `max_pct` % of params: (trial number, spec, held-out metric)."""
    return [(t.number, t.user_attrs["spec"], t.values[0])
            for t in under_pct(ranked_front(storage, study), max_pct)[:n]]


def study_trial_config(storage: str, study: str, backbone: str, data: DataOptions) -> tuple[TrialConfig, int]:
    """The fidelity and selection split the study trained its trials with (its user attributes), as a base
    config, and the size of its held-out split (autopeft.search passes it as a fraction of the training set)."""
    import optuna

    attrs = optuna.load_study(study_name=study, storage=storage).user_attrs
    fid = Fidelity.from_dict(attrs["fidelity"])
    cfg = TrialConfig(task=attrs.get("task", "glue/sst2"), spec={}, backbone=backbone, fidelity=fid, data=data)
    return cfg, int(attrs["selection"]["examples"])


def rescore_run(job: tuple[int, dict, int, TrialConfig, int, str | None]) -> dict[str, Any]:
    """One rescoring run: a front point at the study's fidelity and held-out size, another seed. The seed also
    draws the training subset and the held-out split (autopeft.train.trial_splits), so the mean over seeds
    averages out the luck of the split as well as of the initialisation; every candidate gets the same seeds,
    so they stay comparable. Top level, so that `--jobs` can run it in another process; a run that fails is a
    recorded row."""
    number, spec, seed, base, heldout, label = job
    name = point_name(number, label, kind="rescore")
    cfg = dataclasses.replace(base, spec=spec, fidelity=dataclasses.replace(base.fidelity, seed=seed))
    try:
        task = base.data.load(base.task)
        m = run_trial(cfg, task=task, select="heldout", heldout_fraction=heldout / len(task.train),
                      device=str(pick_device()), progress=False).metrics
        print(f"{name} seed {seed}: held-out {m.metric:.4f}", flush=True)
        return {"name": name, "study": label, "trial": number, "seed": seed, "heldout_metric": m.metric}
    except Exception as e:
        print(f"{name} seed {seed}: ERROR {type(e).__name__}: {e}", flush=True)
        return {"name": name, "study": label, "trial": number, "seed": seed, "error": f"{type(e).__name__}: {e}"}


def rescored_means(candidates: list[tuple[int, dict, float]], runs: list[dict[str, Any]],
                   label: str | None = None) -> dict[int, float]:
    """Trial number -> mean of the study's held-out metric and every successful rescoring run of it (the runs
    of study `label` only, when several studies were rescored together)."""
    values = {number: [own] for number, _, own in candidates}
    for r in runs:
        if "heldout_metric" in r and r["trial"] in values and r.get("study") == label:
            values[r["trial"]].append(r["heldout_metric"])
    return {number: statistics.mean(v) for number, v in values.items()}


def run_all(fn: Any, jobs: list[Any], workers: int) -> list[Any]:
    """`fn` over `jobs`, in `workers` processes when more than one (runs are host-bound at MiniLM size: several
    processes share one GPU well), spread round robin over the visible GPUs."""
    if workers <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from autopeft.worker import visible_gpus

    ctx = mp.get_context("spawn")
    gpus = visible_gpus()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pin_gpu,
                             initargs=(ctx.Value("i", 0), gpus)) as pool:
        return list(pool.map(fn, jobs))


def _pin_gpu(counter: Any, gpus: list[str]) -> None:
    """A pool process's GPU: the next of `gpus` in turn, set before the process touches CUDA (spawned)."""
    if len(gpus) < 2:
        return
    with counter.get_lock():
        i = counter.value
        counter.value += 1
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]


def reused_rows(path: str) -> list[dict[str, Any]]:
    """The baseline rows of an earlier results file of this script, each marked with where it came from. The
    caller must pass a file of the same fidelity (nothing here can check it; the notes name the file). Front rows
    are never reused: they belong to that file's study."""
    rows = json.loads(Path(path).read_text())["rows"]
    return [r | {"reused_from": Path(path).name} for r in rows
            if "seed" in r and "metric" in r and not r["name"].startswith(("autopeft_", "rescore_"))]


def mean_rows(rows: list[dict]) -> dict[str, dict[str, float]]:
    by: dict[str, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            by.setdefault(r["name"], []).append(r)
    return {n: {"acc": statistics.mean(r["metric"] for r in rs), "acc_sd": statistics.pstdev([r["metric"] for r in rs]),
                "params": rs[0]["trainable_params"], "params_pct": rs[0]["trainable_pct"], "seeds": len(rs)}
            for n, rs in by.items()}


def summarize(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-row means over seeds, and the issue's summary keys: the best front point within 1% of params, its gap
    to full fine-tuning, and how many HF PEFT baselines some front point dominates or matches (at least their
    accuracy with at most their params)."""
    means = mean_rows([r for r in rows if "seed" in r and "metric" in r])
    fft = means.get("full_ft", {}).get("acc", float("nan"))
    front = {n: v for n, v in means.items() if n.startswith("autopeft_")}
    le1 = [v["acc"] for v in front.values() if v["params_pct"] <= 1.0]
    best_le1 = max(le1) if le1 else float("nan")
    hf_names = [n for n in means if n.startswith("hf_")]
    dominated = sum(any(f["acc"] >= means[b]["acc"] and f["params"] <= means[b]["params"] for f in front.values())
                    for b in hf_names)
    return means, {"fft_acc": fft, "front_best_le1pct_acc": best_le1, "front_gap_to_fft_points": 100 * (fft - best_le1),
                   "hf_peft_baselines_dominated": dominated, "hf_peft_baselines_total": len(hf_names),
                   **{f"{n}_acc": v["acc"] for n, v in means.items()}}


def studies_of(command: str) -> list[str]:
    """The --study names in a results file's recorded command line."""
    words = shlex.split(command)
    if "--study" not in words:
        return ["glue-sst2"]
    i = words.index("--study") + 1
    names = []
    while i < len(words) and not words[i].startswith("--"):
        names.append(words[i])
        i += 1
    return names


def merged_rows(paths: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One table from several results files of this script at one fidelity (e.g. one study per parameter budget,
    each retrained in its own run): each baseline row once (the first file's), every front point and rescoring
    run, front points of a one-study file named by that study so trial numbers of different studies never
    collide. Raises UserError when the files' fidelities differ (their notes' first clause)."""
    from autopeft.errors import UserError

    records = [json.loads(Path(p).read_text()) for p in paths]
    fidelities = {r["notes"].split(";")[0].split(", seeds")[0] for r in records}
    if len(fidelities) > 1:
        raise UserError(f"--merge: the files were trained at different fidelities ({' | '.join(sorted(fidelities))});"
                        " merge only results of one fidelity")
    rows: list[dict[str, Any]] = []
    baselines: set[tuple[str, Any]] = set()
    for path, record in zip(paths, records, strict=True):
        names = studies_of(record.get("command", ""))
        for r in record["rows"]:
            name = r["name"]
            if name == "means":
                continue
            if name.startswith(("autopeft_trial", "rescore_trial")) and len(names) == 1:
                kind, number = name.split("_trial")
                r = r | {"name": point_name(int(number), names[0], kind), "study": names[0]}
            elif not name.startswith(("autopeft_", "rescore_")):
                if (name, r.get("seed")) in baselines:
                    continue
                baselines.add((name, r.get("seed")))
            rows.append(r | {"merged_from": Path(path).name})
    return rows, records[0]


def one_run(job: tuple[tuple[str, Any, int], TrialConfig, int]) -> dict[str, Any]:
    """One row (a baseline or front point at one seed); a run that cannot train is a recorded row, not a lost
    benchmark. Top level, so that `--jobs` can run it in another process."""
    (name, ours, seed), base, num_layers = job
    device = pick_device()
    task = base.data.load(base.task)
    seeded = dataclasses.replace(base, fidelity=dataclasses.replace(base.fidelity, seed=seed))
    t0 = time.perf_counter()
    try:
        if ours is None:
            m = run_hf(name, seeded, task, device)
            spec: Any = name
        else:
            spec, lr = ours
            spec = {k: v for k, v in spec.items() if k != "num_layers"} | {"num_layers": num_layers}
            m = run_ours(spec, lr, seeded, task, device)
        row = {"name": name, "seed": seed, "spec": spec, **m}
        print(f"{name} seed {seed}: acc {m['metric']:.4f} params {m['trainable_params']:,} "
              f"({m['trainable_pct']:.3f}%) mem {m['peak_memory_mb']:.0f} MiB train {m['train_seconds']:.1f}s "
              f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    except Exception as e:
        row = {"name": name, "seed": seed, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"{name} seed {seed}: ERROR {row['error']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--data-dir", default=os.environ.get("AUTOPEFT_DATA_DIR"))
    ap.add_argument("--examples", type=int, default=None, help="train examples (default: the full train set)")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--storage", nargs="+", default=[],
                    help="the study's storage URL (front points are retrained); one per --study, or one for all")
    ap.add_argument("--study", nargs="+", default=["glue-sst2"],
                    help="several: each study's points are rescored and retrained into one table, named "
                         "autopeft_STUDY_trialN (e.g. one study per parameter budget, `autopeft search --max-params`)")
    ap.add_argument("--front-top", type=int, default=4)
    ap.add_argument("--front-max-pct", type=float, default=1.0)
    ap.add_argument("--rescore", type=int, default=0, metavar="N",
                    help="rank the study's N best front points under --front-max-pct by the mean held-out metric of "
                         "reruns at the study's fidelity (--rescore-seeds) before choosing what to retrain")
    ap.add_argument("--rescore-seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--only", nargs="*", help="run only these rows (names)")
    ap.add_argument("--reuse", help="an earlier baselines-*.json at the same fidelity: its baseline rows fill the "
                                     "table where this run skips them (--only / --front-only)")
    ap.add_argument("--front-only", action="store_true", help="train only the study's front points")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, each in its own process (round robin over the visible GPUs)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="train nothing: one table and summary from earlier results files of this script at one "
                         "fidelity (e.g. one study per parameter budget, each retrained in its own run)")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out, ap)
        return
    if args.rescore < 0 or (args.rescore and not args.storage):
        ap.error("--rescore N needs N >= 0 and a study (--storage, --study) whose front points it reruns")
    if len(args.storage) not in (0, 1, len(args.study)):
        ap.error(f"--storage takes one URL for all studies or one per --study: got {len(args.storage)} URLs for "
                 f"{len(args.study)} studies")
    sources = list(zip(args.storage * len(args.study) if len(args.storage) == 1 else args.storage, args.study))
    # (storage, study, row-name label): a label only where several studies' trial numbers could collide
    sources = [(url, name, name if len(sources) > 1 else None) for url, name in sources]

    device = pick_device()
    data = DataOptions(data_dir=args.data_dir)
    base = TrialConfig(task="glue/sst2", spec={}, backbone=args.backbone, data=data,
                       fidelity=Fidelity(train_examples=args.examples, epochs=args.epochs, batch_size=args.batch_size,
                                         max_length=args.max_length, eval_batch_size=256))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_backbone(args.backbone))
    num_layers, hidden = config.num_hidden_layers, config.hidden_size
    jobs: list[tuple[str, Any]] = [(n, None) for n in HF_LR]
    jobs += [(n, ({"serial_adapter": {"size": hidden // 16, "position": pos}}, lr)) for n, (pos, lr) in OURS.items()]
    reused = reused_rows(args.reuse) if args.reuse else []
    rescored: list[dict[str, Any]] = []
    rankings: dict[str | None, dict[int, float]] = {}
    if sources and args.rescore > 0:
        candidates = {label: rescore_candidates(url, name, args.rescore, args.front_max_pct)
                      for url, name, label in sources}
        rescore_jobs = []
        for url, name, label in sources:  # every study's reruns in one pool
            study_base, heldout = study_trial_config(url, name, args.backbone, data)
            rescore_jobs += [(n, spec | {"num_layers": num_layers}, seed, study_base, heldout, label)
                             for n, spec, _ in candidates[label] for seed in args.rescore_seeds]
        rescored = run_all(rescore_run, rescore_jobs, args.jobs)
        for _, _, label in sources:
            rankings[label] = rescored_means(candidates[label], rescored, label)
            print(f"rescored {label or ''} (mean held-out): " + ", ".join(
                f"trial {n} {v:.4f}" for n, v in sorted(rankings[label].items(), key=lambda kv: -kv[1])), flush=True)
        own = {(label, number): value for label, cands in candidates.items() for number, _, value in cands}
        for r in rescored:  # beside each rerun, the study's own run of that configuration
            r["study_heldout_metric"] = own[r["study"], r["trial"]]
    if sources:
        budgets = {r["name"]: r["trainable_params"] for r in reused if r["name"].startswith("hf_")}
        front = [point for url, name, label in sources
                 for point in front_specs(url, name, args.front_top, args.front_max_pct, budgets,
                                          rankings.get(label), label)]
        jobs = [j for j in jobs if not args.front_only] + [(n, (spec, None)) for n, spec in front]
    if args.only:
        jobs = [j for j in jobs if j[0] in args.only]
    reused = [r for r in reused if r["name"] not in {n for n, _ in jobs}]
    runs = [(name, ours, seed) for seed in args.seeds for name, ours in jobs]
    rows = run_all(one_run, [(r, base, num_layers) for r in runs], args.jobs)
    rows += reused
    means, summary = summarize(rows)
    rows.append({"name": "means", "means": means})
    rows += rescored
    write_results("baselines", rows, summary, out_dir=args.out, device=device,
                  notes=f"SST-2, {args.backbone}, train examples {args.examples or 'all'}, {args.epochs} epoch(s), "
                        f"batch {args.batch_size}, max length {args.max_length}, seeds {args.seeds}; "
                        f"{args.jobs} run(s) at a time on one device (train seconds are under that sharing); "
                        f"HF PEFT lrs {HF_LR}; adapters lr 1e-3; front points from study {', '.join(args.study)}"
                        + (f"; rows {sorted({r['name'] for r in reused})} reused from {args.reuse} (same script "
                           "and fidelity, not rerun)" if reused else "")
                        + (f"; front points ranked by the mean held-out metric of the study's run and reruns at its "
                           f"fidelity with seeds {args.rescore_seeds} (--rescore {args.rescore}; rows rescore_trial*)"
                           if rankings else ""))


def merge(paths: list[str], out: str, ap: argparse.ArgumentParser) -> None:
    """--merge: the rows of `paths` in one file, the summary recomputed over all of them (no GPU needed)."""
    from autopeft.errors import UserError

    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        ap.error(f"--merge: no such file: {', '.join(missing)}")
    try:
        rows, first = merged_rows(paths)
    except UserError as e:
        ap.error(str(e))
    means, summary = summarize(rows)
    rows.append({"name": "means", "means": means})
    write_results("baselines", rows, summary, out_dir=out, device=first["device"], versions_of=first["versions"],
                  notes=f"merged from {', '.join(Path(p).name for p in paths)} (no run of its own; rows keep "
                        f"merged_from). {first['notes'].split(';')[0]}")


if __name__ == "__main__":
    main()
