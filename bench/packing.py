"""Issue "trial packing": search trials per GPU-hour, packed on one shared backbone, against the same trials run
one by one with HF PEFT and with our own (unpacked) trainer.

The same N search-fidelity trials (LoRA-family specs HF PEFT can express exactly, so all three arms train the
same models: LoRA at several ranks and sites, DoRA, IA3) are trained three ways, each timed wall-clock from
loading the backbone to the scored trial, evaluation included, i.e. what a search worker spends per trial:

* `hf_peft`: `peft.get_peft_model` with the config `autopeft.export` maps each spec to, trained by our loop
  (`train.train_and_evaluate`) eagerly (`cuda_graphs="off"`), one trial after another: HF PEFT as people run it;
* `hf_peft_graphed` (with `--hf-graphed`): the same, but with our loop's CUDA graphs (`cuda_graphs="auto"`), the
  strongest HF PEFT baseline we can give it;
* `unpacked`: `train.run_trial`, one trial after another, with the fidelity's `cuda_graphs` (auto: graphed on CUDA);
* `packed`: `packing.train_pack`, `--pack-size` trials at a time on one shared frozen backbone, its packed step
  as CUDA graphs under the fidelity's `cuda_graphs` (auto: graphed on CUDA; `packed_graphed` in the summary
  says whether every pack ran graphed, `pack_real_tokens_per_s_*` its throughput in the trials' own,
  unpadded tokens: SST-2's sentences are short, so a step is small);
* `packed_eager` (with `--packed-eager`): the same packs with `cuda_graphs="off"`, the eager packed step.

At roberta-large size on a GPU the summary's `pack_tokens_per_s_roberta_large` is the issue's aggregate
training throughput: a pack of `--pack-size` of these trials stepping over full rows (32 x 128 tokens each, the
shape the issue's saturated floor was measured at), graphed as `train_pack` runs it, timed by
bench/packing_step.py's `grouped_graphed` arm in the same process (`--no-step` leaves it out).

Every arm uses the same seeds, data, fidelity and bf16 autocast. The packed and unpacked arms train the same
models step for step, dropout masks included (`autopeft.dropout`: keyed by trial, step and row; attention's
dropout off in both), so their accuracies should agree closely: `max_acc_diff_points` is the largest gap, in
points, over the N trials. The HF PEFT arms keep the backbone's own dropout, attention's included.

    python bench/packing.py                              # GPU: RoBERTa-large, SST-2, 8 trials, packs of 8
    python bench/packing.py --trials 16 --pack-size 8    # two packs
    python bench/packing.py --tiny                       # CPU smoke test: tiny random BERT, toy data, seconds

The GPU machine has no network: `--backbone` must be a local directory or a model already in the Hugging Face
cache (with HF_HUB_OFFLINE=1), and `--data-dir` the GLUE files (default ../shared/data).

Writes bench/results/packing-<device>-<date>.json (`packing_tiny-...` for --tiny) and prints the summary last.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, write_results

from autopeft import precision
from autopeft.errors import TrialFailed
from autopeft.models import load_backbone, resolve_backbone
from autopeft.spec import CUDA_GRAPH_MODES, Fidelity, PeftSpec
from autopeft.train import DataOptions, TrialConfig, TrialResult, pick_device, run_trial, train_and_evaluate

#: LoRA-family search trials HF PEFT can express exactly (so the HF arm trains the same models)
SPECS: list[dict[str, Any]] = [
    {"lora": {"rank": {"q": 8, "v": 8}}},
    {"lora": {"rank": {"q": 16, "v": 16}, "alpha_ratio": 2.0}},
    {"lora": {"rank": {"q": 4, "k": 4, "v": 4, "o": 4}}},
    {"lora": {"rank": {"ffn_in": 8, "ffn_out": 8}}},
    {"lora": {"rank": {"q": 2, "k": 2, "v": 2, "o": 2, "ffn_in": 2, "ffn_out": 2}}},
    {"lora": {"rank": {"q": 8, "v": 8}, "dora": True}},
    {"ia3": ["k", "v", "ffn_out"]},
    {"lora": {"rank": {"q": 32, "v": 32}}},
]


def hf_peft_config(cfg: TrialConfig, task: Any) -> Any:
    """The HF PEFT config that computes what our spec computes (`autopeft.export.hf_peft_adapter`), trainable."""
    import peft

    from autopeft.export import hf_peft_adapter
    from autopeft.peft import inject

    model, _ = load_backbone(cfg.backbone, task.num_labels, regression=task.is_regression)
    spec = PeftSpec.from_dict(cfg.spec, num_layers=model.config.num_hidden_layers)
    inject(model, spec)
    config = dict(hf_peft_adapter(model, spec).config)
    config["inference_mode"] = False
    config.pop("base_model_name_or_path", None)
    return peft.get_peft_config(config)


def run_hf_peft(cfg: TrialConfig, peft_config: Any, task: Any, device: Any) -> dict[str, Any]:
    """One trial the HF PEFT way: load, `get_peft_model`, our training loop and evaluation."""
    import peft
    import torch

    torch.manual_seed(cfg.fidelity.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load_backbone(cfg.backbone, task.num_labels, regression=task.is_regression, dtype=dtype)
    head = {"classifier", "score"}
    backbone_params = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] not in head)
    torch.manual_seed(cfg.fidelity.seed)
    model = peft.get_peft_model(model, peft_config)
    metrics, _ = train_and_evaluate(model, tok, task, cfg.fidelity, backbone_params=backbone_params,
                                    cache_tag=(resolve_backbone(cfg.backbone), task.name, task.source),
                                    label="hf-peft", device=device, progress=False)
    return metrics.to_dict()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tiny_setup(root: Path) -> tuple[str, DataOptions]:
    """A saved tiny random BERT (MiniLM's tokenizer) and a learnable toy CSV task, for the CPU smoke mode."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    backbone = save_random_bert(config, root / "tiny-bert")
    words = {1: ["great", "superb", "lovely", "fun"], 0: ["awful", "dull", "boring", "bad"]}
    files = []
    for name, n, seed in (("train.csv", 256, 0), ("dev.csv", 64, 1)):
        rng = random.Random(seed)
        lines = ["review,label"]
        for _ in range(n):
            y = rng.randint(0, 1)
            filler = " ".join(rng.choice(["the", "film", "was", "quite", "a"]) for _ in range(rng.randint(2, 9)))
            lines.append(f"{filler} {rng.choice(words[y])} {filler},{'pos' if y else 'neg'}")
        (root / name).write_text("\n".join(lines) + "\n")
        files.append(str(root / name))
    return str(backbone), DataOptions(train_file=files[0], dev_file=files[1], text_column="review",
                                      label_column="label")


def random_large(root: Path, tokenizer: str | None = None) -> str:
    """A roberta-large-size encoder (24 layers, 1024 hidden, 16 heads, 4096 FFN; BERT architecture, MiniLM's
    tokenizer) with random weights, saved in bf16: the machine running this has no network, and speed does not
    depend on the weights. Accuracies of this arm are those of a random encoder (the speed is the point)."""
    import torch
    from transformers import BertConfig

    config = BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, max_position_embeddings=514, num_labels=2)
    return str(save_random_bert(config, root / "random-roberta-large-size", dtype=torch.bfloat16,
                                tokenizer=tokenizer))


def save_random_bert(config: Any, backbone: Path, *, dtype: Any = None, tokenizer: str | None = None) -> Path:
    """A seeded random BERT-architecture classifier saved at `backbone`, with a BERT tokenizer copied beside it
    (from `tokenizer`, default MiniLM's): a loadable local model without any download."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from autopeft.models import packaged_minilm

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    (model.to(dtype) if dtype is not None else model).save_pretrained(backbone)
    source = Path(tokenizer) if tokenizer else packaged_minilm()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / f).is_file():
            shutil.copy(source / f, backbone / f)
    return backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny random BERT, toy data, few steps")
    ap.add_argument("--backbone", default="random-roberta-large",
                    help="a local dir, 'minilm', or random-roberta-large (random weights at that size, built here)")
    ap.add_argument("--tokenizer", help="a model dir whose BERT tokenizer the random model uses (default: MiniLM's)")
    ap.add_argument("--task", default="glue/sst2")
    ap.add_argument("--data-dir", default=os.environ.get("AUTOPEFT_DATA_DIR") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--trials", type=int, default=8, help="trials per arm (cycling through the specs)")
    ap.add_argument("--pack-size", type=int, default=8)
    ap.add_argument("--examples", type=int, default=2000, help="training examples per trial (search fidelity)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true", help="leave out the HF PEFT arm")
    ap.add_argument("--hf-graphed", action="store_true",
                    help="add an HF PEFT arm trained with our loop's CUDA graphs (hf_peft_graphed)")
    ap.add_argument("--packed-eager", action="store_true",
                    help="add the packs trained with the eager packed step (cuda_graphs off: packed_eager)")
    ap.add_argument("--cuda-graphs", choices=CUDA_GRAPH_MODES, default="auto",
                    help="fidelity.cuda_graphs of our unpacked and packed arms (default auto: graphed on CUDA)")
    ap.add_argument("--fp32-norms", action="store_true",
                    help="autocast's fp32 LayerNorm outputs (the trainer's before 2026-11-30) instead of the "
                         "backbone's bf16 (autopeft.precision), to compare the two")
    ap.add_argument("--no-step", action="store_true",
                    help="leave out the pack's step throughput over full rows (bench/packing_step.py's graphed arm, "
                         "run at roberta-large size on a GPU)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    from autopeft.packing import train_pack

    tmp = None
    if args.tiny:
        tmp = Path(tempfile.mkdtemp(prefix="autopeft-bench-packing-"))
        backbone, data = tiny_setup(tmp)
        task_name, device = "file", pick_device("cpu")
        fid = Fidelity(train_examples=None, max_steps=6, batch_size=16, max_length=32, lr=1e-3)
        args.trials, args.pack_size = min(args.trials, 4), min(args.pack_size, 4)
    else:
        backbone, data, task_name, device = args.backbone, DataOptions(data_dir=args.data_dir), args.task, pick_device()
        if backbone == "random-roberta-large":
            tmp = Path(tempfile.mkdtemp(prefix="autopeft-bench-packing-"))
            backbone = random_large(tmp, args.tokenizer)
        fid = Fidelity(train_examples=args.examples, epochs=args.epochs, batch_size=args.batch_size,
                       max_length=args.max_length)
    fid = dataclasses.replace(fid, cuda_graphs=args.cuda_graphs)
    step: dict[str, float] = {}  # first: the shortest part, and it needs the GPU's memory to itself
    if args.backbone == "random-roberta-large" and device.type == "cuda" and not args.no_step and not args.tiny:
        step = step_throughput(args.pack_size, device)
        print(f"pack step over full rows: {step['pack_tokens_per_s_roberta_large']:,.0f} tokens/s", flush=True)
    precision.FP32_NORMS = args.fp32_norms
    task = data.load(task_name)
    configs = [TrialConfig(task=task_name, spec=SPECS[i % len(SPECS)], backbone=backbone,
                           fidelity=dataclasses.replace(fid, seed=i), data=data) for i in range(args.trials)]
    rows: list[dict[str, Any]] = []
    wall: dict[str, float] = {}

    # warm-up (not timed): CUDA context, kernels' first launches, the tokenizer cache every arm then shares, and
    # a short pack, so that no timed arm compiles Triton kernels (a search compiles them once, in its first
    # trials): with the unpacked trial alone, the same command's trials per hour moved 1.1x to 1.6x with the
    # order two runs came in (packing_minilm_bf16_norms_a- and _b-h200-2026-11-30.json)
    warm = dataclasses.replace(fid, max_steps=2)
    run_trial(dataclasses.replace(configs[0], fidelity=warm), task=task, device=str(device), progress=False)
    train_pack([dataclasses.replace(c, fidelity=dataclasses.replace(c.fidelity, max_steps=2))
                for c in configs[:args.pack_size]], task=task, device=str(device))

    hf_arms = [] if args.skip_hf else [("hf_peft", "off")] + ([("hf_peft_graphed", "auto")] if args.hf_graphed else [])
    hf_configs = [hf_peft_config(c, task) for c in configs] if hf_arms else []  # mapping only: not timed
    for arm, graphs in hf_arms:
        _sync()
        t0 = time.perf_counter()
        for i, (c, pc) in enumerate(zip(configs, hf_configs, strict=True)):
            c = dataclasses.replace(c, fidelity=dataclasses.replace(c.fidelity, cuda_graphs=graphs))
            m = run_hf_peft(c, pc, task, device)
            rows.append({"arm": arm, "trial": i, "spec": c.spec, **m})
            print(f"{arm:<15} {i}: acc {m['metric']:.4f}  {m['train_seconds']:.1f}s train", flush=True)
        _sync()
        wall[arm] = time.perf_counter() - t0

    _sync()
    t0 = time.perf_counter()
    unpacked: list[TrialResult | TrialFailed] = []
    for i, c in enumerate(configs):
        try:
            r = run_trial(c, task=task, device=str(device), progress=False)
        except TrialFailed as exc:
            r = exc
        unpacked.append(r)
        rows.append({"arm": "unpacked", "trial": i, "spec": c.spec, **_row(r)})
        print(f"unpacked  {i}: {_label(r)}", flush=True)
    _sync()
    wall["unpacked"] = time.perf_counter() - t0

    packs: dict[str, tuple[list[TrialResult | TrialFailed], list[dict[str, Any]]]] = {}
    for arm in ("packed", "packed_eager") if args.packed_eager else ("packed",):
        arm_configs = configs if arm == "packed" else [
            dataclasses.replace(c, fidelity=dataclasses.replace(c.fidelity, cuda_graphs="off")) for c in configs]
        _sync()
        t0 = time.perf_counter()
        results: list[TrialResult | TrialFailed] = []
        arm_rows = []
        for start in range(0, len(arm_configs), args.pack_size):
            pack = train_pack(arm_configs[start:start + args.pack_size], task=task, device=str(device))
            results.extend(pack.results)
            st = pack.stats
            arm_rows.append({"arm": "pack" if arm == "packed" else "pack_eager", "first_trial": start,
                             "size": st.size, "train_seconds": st.train_seconds, "tokens": st.tokens,
                             "tokens_per_s": st.tokens_per_s, "peak_memory_mb": st.peak_memory_mb,
                             "steps": st.steps, "cuda_graphs": st.cuda_graphs, "graph_captures": st.graph_captures,
                             "graph_replays": st.graph_replays, "graph_steps_eager": st.graph_steps_eager,
                             "graph_failure": st.graph_failure})
            print(f"{arm} pack of {st.size}: {st.tokens_per_s:,.0f} tokens/s, peak {st.peak_memory_mb:,.0f} MiB, "
                  f"graphed {st.cuda_graphs} ({st.graph_captures} captures, {st.graph_replays} replays"
                  f"{', failure: ' + st.graph_failure if st.graph_failure else ''})", flush=True)
        _sync()
        wall[arm] = time.perf_counter() - t0
        for i, (c, r) in enumerate(zip(configs, results, strict=True)):
            rows.append({"arm": arm, "trial": i, "spec": c.spec, **_row(r)})
            print(f"{arm:<9} {i}: {_label(r)}", flush=True)
        rows.extend(arm_rows)
        packs[arm] = (results, arm_rows)
    packed, pack_rows = packs["packed"]

    per_hour = {arm: 3600.0 * len(configs) / s for arm, s in wall.items()}
    diffs = [abs(p.metrics.metric - u.metrics.metric) * 100 for p, u in zip(packed, unpacked, strict=True)
             if isinstance(p, TrialResult) and isinstance(u, TrialResult)]
    short = "tiny" if args.tiny else _short(args.backbone)
    pack_tokens = sum(r["tokens"] for r in pack_rows)
    pack_seconds = sum(r["train_seconds"] for r in pack_rows)
    summary: dict[str, float] = {
        "trials_per_gpu_hour_packed": per_hour["packed"],
        "trials_per_gpu_hour_unpacked": per_hour["unpacked"],
        "trials_per_gpu_hour_speedup_vs_unpacked": per_hour["packed"] / per_hour["unpacked"],
        f"pack_real_tokens_per_s_{short}": pack_tokens / pack_seconds if pack_seconds > 0 else 0.0,
        "packed_graphed": float(all(r["cuda_graphs"] for r in pack_rows)),  # every pack's steps as CUDA graphs
        "max_acc_diff_points": max(diffs) if diffs else float("nan"),
        "failed_packed": sum(isinstance(r, TrialFailed) for r in packed),
        "failed_unpacked": sum(isinstance(r, TrialFailed) for r in unpacked),
        "trials": len(configs),
        "pack_size": args.pack_size,
    }
    if "packed_eager" in packs:
        eager_rows = packs["packed_eager"][1]
        eager_seconds = sum(r["train_seconds"] for r in eager_rows)
        summary["trials_per_gpu_hour_packed_eager"] = per_hour["packed_eager"]
        summary["trials_per_gpu_hour_packed_graphed_vs_eager"] = per_hour["packed"] / per_hour["packed_eager"]
        summary[f"pack_real_tokens_per_s_eager_{short}"] = (sum(r["tokens"] for r in eager_rows) / eager_seconds
                                                       if eager_seconds > 0 else 0.0)
    best = max(per_hour["packed"], per_hour["unpacked"])  # what a worker gets running the faster of the two
    for arm in ("hf_peft", "hf_peft_graphed"):
        if arm in per_hour:
            summary[f"trials_per_gpu_hour_{arm}"] = per_hour[arm]
            summary[f"trials_per_gpu_hour_speedup_vs_{arm}"] = per_hour["packed"] / per_hour[arm]
            summary[f"trials_per_gpu_hour_best_ours_speedup_vs_{arm}"] = best / per_hour[arm]
    summary |= mean_acc_diffs(rows)
    summary |= rerun_acc_diffs(rows)
    summary |= step
    what = "tiny random BERT, toy CSV (smoke test: the numbers mean nothing)" if args.tiny else \
        f"{args.backbone} on {args.task}"
    norms = "fp32 (autocast's, --fp32-norms)" if args.fp32_norms else "bf16 (autopeft.precision)"
    notes = (f"{what}; {len(configs)} trials per arm, packs of {args.pack_size}; fidelity {fid.to_dict()}; "
             f"seeds 0..{len(configs) - 1}; wall-clock per arm from loading to scored trial, evaluation included "
             f"cuda_graphs: unpacked {fid.cuda_graphs}, hf_peft off, hf_peft_graphed auto, packed {fid.cuda_graphs} "
             f"(packs ran graphed: {'yes' if summary['packed_graphed'] else 'no'}; packed_graphed = 1 when every "
             "pack's steps ran as CUDA graphs), packed_eager off; "
             "(our unpacked arm keeps the loaded backbone in memory between trials, as a search worker does; the "
             "HF PEFT arm loads it for each trial, as a script per trial would); "
             "pack_real_tokens_per_s_* = training tokens of the packs (padding excluded) / their training "
             "seconds; pack_tokens_per_s_roberta_large = the pack's graphed step over full rows "
             "(bench/packing_step.py, step_* keys); LayerNorm outputs "
             f"{norms}; {device_name(device)}")
    name = ("packing" if short == "roberta_large" else f"packing_{short}") + ("_fp32_norms" if args.fp32_norms else "")
    write_results(name, rows, summary, out_dir=args.out, notes=notes, device=device)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def mean_acc_diffs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """`mean_acc_diff_points_vs_<arm>`: |mean accuracy of the packed arm - that arm's| over the same trials, in
    points. Why beside `max_acc_diff_points`: the speedup target compares arms at equal accuracy, and with dropout
    a packed trial draws its masks in another order than alone, so single trials differ by seed noise (several
    points at 2,000 training examples) while the arms' means should not."""
    acc = _accuracies(rows)
    packed = acc.get("packed", {})
    out = {}
    for arm in ("hf_peft", "hf_peft_graphed", "unpacked"):
        both = sorted(set(packed) & set(acc.get(arm, {})))
        if both:
            gap = sum(packed[t] - acc[arm][t] for t in both) / len(both)
            out[f"mean_acc_diff_points_vs_{arm}"] = abs(gap) * 100
    return out


def _accuracies(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    acc: dict[str, dict[int, float]] = {}
    for r in rows:
        if "trial" in r and r.get("metric") is not None:
            acc.setdefault(r["arm"], {})[r["trial"]] = r["metric"]
    return acc


#: pairs of arms that train the very same models with the same code, seeds and data, and differ only in whether
#: the step runs as a CUDA graph, which draws dropout's random numbers in another order
RERUN_PAIRS = (("hf_peft", "hf_peft_graphed"), ("packed", "packed_eager"))


def rerun_acc_diffs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """`max_acc_diff_points_<a>_vs_<b>` for each of RERUN_PAIRS: the largest per-trial gap, in points, between
    two runs of the same trials. Why: `max_acc_diff_points` (packed against unpacked) compares trials whose
    dropout masks differ, and this is how far single trials move for that reason alone, with no packing."""
    acc = _accuracies(rows)
    out = {}
    for a, b in RERUN_PAIRS:
        both = sorted(set(acc.get(a, {})) & set(acc.get(b, {})))
        if both:
            out[f"max_acc_diff_points_{a}_vs_{b}"] = max(abs(acc[a][t] - acc[b][t]) for t in both) * 100
    return out


def _short(backbone: str) -> str:
    """The summary-key name of a backbone: roberta_large for any roberta-large(-size) one, else its last part."""
    name = Path(str(backbone)).name.lower()
    return "roberta_large" if "roberta-large" in name else name.replace("-", "_") or "backbone"


def _row(r: TrialResult | TrialFailed) -> dict[str, Any]:
    if isinstance(r, TrialFailed):
        return {"failed": r.reason, "detail": r.detail}
    return r.metrics.to_dict()


def step_throughput(pack_size: int, device: Any) -> dict[str, float]:
    """The issue's aggregate throughput: bench/packing_step.py's graphed arm (a pack of `pack_size` of SPECS, each
    32 rows x 128 tokens, every row full, on a random roberta-large-size BERT), tokens per second."""
    import packing_step

    ns = packing_step.parser().parse_args(["--pack-size", str(pack_size)])  # its defaults: 32 rows x 128 tokens
    _, ms, _ = packing_step.run_arms(ns, device, ["grouped_graphed"])
    import gc

    import torch

    gc.collect()  # the step's model, stacks and graph pool (reference cycles) gone before the arms' memory is read
    torch.cuda.empty_cache()
    tokens = pack_size * ns.batch_size * ns.max_length
    return {"pack_tokens_per_s_roberta_large": tokens / (ms["grouped_graphed"] / 1000),
            "step_ms_pack_graphed": ms["grouped_graphed"], "step_tokens": float(tokens)}


def _label(r: TrialResult | TrialFailed) -> str:
    if isinstance(r, TrialFailed):
        return f"FAILED {r.reason}: {r.detail}"
    m = r.metrics
    return f"acc {m.metric:.4f}  {m.train_seconds:.1f}s train  {m.tokens_per_s:,.0f} tokens/s"


if __name__ == "__main__":
    main()
