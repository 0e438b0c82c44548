"""Issue "one PEFT trial end to end": SST-2 accuracy of our LoRA and serial adapter, and HF PEFT's LoRA through
the very same training loop, at equal settings, measured side by side in one run.

    python bench/trial.py                      # 4,000 examples, 3 epochs, MiniLM, CPU or GPU
    python bench/trial.py --examples 500 --epochs 1   # a quick look
    python bench/trial.py --cuda-graphs-ab     # GPU: the same trials with --cuda-graphs on and off, side by side

Writes bench/results/trial-<device>-<date>.json (see DESIGN.md) and prints the summary last; the A/B run writes
trial_graphs-<device>-<date>.json: per spec and mode, step time (train seconds / steps), the trial's wall time
(model copy, injection, training, evaluation), peak memory and dev accuracy, with the same spec and seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, write_results

from autopeft.models import load_backbone, resolve_backbone
from autopeft.spec import Fidelity
from autopeft.train import DataOptions, TrialConfig, pick_device, run_trial, train_and_evaluate


def hf_peft_lora(cfg: TrialConfig, task, device) -> dict:
    """HF PEFT's LoRA r=8 on query/value, trained by our loop with the same seed, data and learning rate."""
    import peft
    import torch

    torch.manual_seed(cfg.fidelity.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok = load_backbone(cfg.backbone, task.num_labels, dtype=dtype)
    backbone_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier"))
    torch.manual_seed(cfg.fidelity.seed)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["query", "value"]))
    metrics, _ = train_and_evaluate(model, tok, task, cfg.fidelity, backbone_params=backbone_params,
                                    cache_tag=(resolve_backbone(cfg.backbone), task.name, task.source),
                                    label="hf-peft lora r8 q,v", device=device)
    return metrics.to_dict()


#: the A/B's specs: LoRA on every linear (the most launches per step) and the paper's serial adapter
AB_SPECS = {
    "lora_r8_all": {"lora": {"rank": dict.fromkeys(("q", "k", "v", "o", "ffn_in", "ffn_out"), 8)}},
    "serial_adapter_16": {"serial_adapter": {"size": 16}},
}


def cuda_graphs_ab(base: TrialConfig, task, args: argparse.Namespace) -> None:
    """Each AB_SPECS trial with `cuda_graphs` off, then on (same spec, seed, data): what the graphed step buys a
    whole trial. A short untimed trial per mode first pays the process's one-time costs (CUDA context, cuBLAS,
    the tokenisation cache, the backbone template), so neither side is charged for them."""
    import torch

    device = pick_device()
    if device.type != "cuda":
        raise SystemExit("--cuda-graphs-ab needs a CUDA GPU (graphs are never used on CPU)")
    for mode in ("off", "on"):
        warm = dataclasses.replace(base, spec=AB_SPECS["lora_r8_all"],
                                   fidelity=dataclasses.replace(base.fidelity, max_steps=3, cuda_graphs=mode))
        run_trial(warm, task=task, progress=False)
    rows, summary = [], {}
    for name, spec in AB_SPECS.items():
        for mode in ("off", "on"):
            cfg = dataclasses.replace(base, spec=spec, fidelity=dataclasses.replace(base.fidelity, cuda_graphs=mode))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = run_trial(cfg, task=task, progress=False).metrics.to_dict()
            wall = time.perf_counter() - t0
            row = {"name": name, "cuda_graphs": mode, "spec": spec, "trial_s": wall,
                   "step_ms": 1e3 * m["train_seconds"] / max(1, m["steps"]), **m}
            rows.append(row)
            print(f"{name:18s} graphs {mode:3s}: step {row['step_ms']:.2f} ms  trial {wall:.1f} s  "
                  f"train {m['train_seconds']:.1f} s  peak {m['peak_memory_mb']:.0f} MiB  dev acc {m['metric']:.4f}  "
                  f"graphed={m['extra'].get('cuda_graphs')}", flush=True)
        off, on = rows[-2], rows[-1]
        for key, field in (("step_ms", "step_ms"), ("trial_s", "trial_s"), ("train_s", "train_seconds"),
                           ("peak_mb", "peak_memory_mb"), ("acc", "metric")):
            summary[f"sst2_{name}_eager_{key}"] = off[field]
            summary[f"sst2_{name}_graphs_{key}"] = on[field]
        summary[f"sst2_{name}_graphs_step_speedup"] = off["step_ms"] / on["step_ms"]
        summary[f"sst2_{name}_graphs_trial_speedup"] = off["trial_s"] / on["trial_s"]
        summary[f"sst2_{name}_graphs_peak_x_eager"] = on["peak_memory_mb"] / off["peak_memory_mb"]
        summary[f"sst2_{name}_graphs_used"] = float(on["extra"].get("cuda_graphs", 0.0))
    summary |= {"train_examples": args.examples, "epochs": args.epochs}
    write_results("trial_graphs", rows, summary, out_dir=args.out,
                  notes=f"SST-2 dev (872), {args.backbone}, {device_name(device)}, --cuda-graphs off vs on, same "
                        f"spec and seed {args.seed}; batch 32, max_length 128, lr 1e-3; step_ms = train seconds / "
                        f"steps; trial_s = run_trial's wall time (copy, inject, train, evaluate)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--data-dir", default=os.environ.get("AUTOPEFT_DATA_DIR") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--cuda-graphs-ab", action="store_true",
                    help="GPU: time trials with --cuda-graphs off and on side by side instead (trial_graphs-*.json)")
    args = ap.parse_args()

    device = pick_device()
    fid = Fidelity(train_examples=args.examples, epochs=args.epochs, max_length=128, batch_size=32, seed=args.seed,
                   lr=1e-3)
    base = TrialConfig(task="glue/sst2", spec={}, backbone=args.backbone, fidelity=fid,
                       data=DataOptions(data_dir=args.data_dir))
    task = base.data.load(base.task)
    if args.cuda_graphs_ab:
        cuda_graphs_ab(base, task, args)
        return
    runs = {
        "ours_lora_r8_qv": {"lora": {"rank": {"q": 8, "v": 8}}},
        "ours_serial_adapter_16": {"serial_adapter": {"size": 16}},
    }
    rows = []
    for name, spec in runs.items():
        m = run_trial(dataclasses.replace(base, spec=spec), task=task).metrics.to_dict()
        rows.append({"name": name, "spec": spec, **m})
        print(f"{name}: dev acc {m['metric']:.4f}  params {m['trainable_params']:,}  {m['train_seconds']:.0f}s",
              flush=True)
    hf = hf_peft_lora(base, task, device)
    rows.append({"name": "hf_peft_lora_r8_qv",
                 "spec": "peft.LoraConfig(r=8, lora_alpha=8, target_modules=[query, value])", **hf})
    print(f"hf_peft_lora_r8_qv: dev acc {hf['metric']:.4f}  params {hf['trainable_params']:,}", flush=True)
    by = {r["name"]: r for r in rows}
    summary = {
        "sst2_lora_r8_qv_acc": by["ours_lora_r8_qv"]["metric"],
        "sst2_adapter16_acc": by["ours_serial_adapter_16"]["metric"],
        "sst2_lora_r8_qv_train_s": by["ours_lora_r8_qv"]["train_seconds"],
        "sst2_hf_peft_lora_r8_qv_acc": hf["metric"],
        "lora_minus_hf_peft_points": 100 * (by["ours_lora_r8_qv"]["metric"] - hf["metric"]),
        "train_examples": args.examples,
        "epochs": args.epochs,
    }
    write_results("trial", rows, summary, out_dir=args.out,
                  notes=f"SST-2 dev (872), {args.backbone}, {device_name(device)}, AdamW lr 1e-3, warm-up 6% + "
                        f"linear decay, batch 32, max_length 128, seed {args.seed}; HF PEFT trained by the same loop")


if __name__ == "__main__":
    main()
