"""Issue "one PEFT trial end to end": SST-2 accuracy of our LoRA and serial adapter, and HF PEFT's LoRA through
the very same training loop, at equal settings, measured side by side in one run.

    python bench/trial.py                      # 4,000 examples, 3 epochs, MiniLM, CPU or GPU
    python bench/trial.py --examples 500 --epochs 1   # a quick look

Writes bench/results/trial-<device>-<date>.json (see DESIGN.md) and prints the summary last.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=4000)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--data-dir", default=os.environ.get("AUTOPEFT_DATA_DIR") or str(
        Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()

    device = pick_device()
    fid = Fidelity(train_examples=args.examples, epochs=args.epochs, max_length=128, batch_size=32, seed=args.seed,
                   lr=1e-3)
    base = TrialConfig(task="glue/sst2", spec={}, backbone=args.backbone, fidelity=fid,
                       data=DataOptions(data_dir=args.data_dir))
    task = base.data.load(base.task)
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
