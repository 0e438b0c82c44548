"""`autopeft search --pack-size auto` on a GPU: which pack sizes the planner chose, from its estimate and then from
each pack's measured memory, and how close the packs came to the device's memory.

Why: the planner (`autopeft/pack_size.py`) can only be checked for real where memory is measured, on CUDA. This
runs the search as a user would (the CLI, a random roberta-large-size backbone built here, SST-2 from a local
data dir, no MLflow), then reads every pack's record from the study (`autopeft.pack`: size, peak, backbone).

    python bench/pack_size_auto.py --tokenizer DIR --data-dir DIR --out bench/results
    # writes pack_size_auto-<device>-<date>.json; --batch-size sets how much memory a trial takes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results
from packing import random_large


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="a model dir whose BERT tokenizer the random model uses (default: MiniLM's)")
    ap.add_argument("--data-dir", default=os.environ.get("AUTOPEFT_DATA_DIR"), help="holds glue/sst2")
    ap.add_argument("--n-trials", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    import optuna
    import torch

    if not torch.cuda.is_available():
        sys.exit("pack_size_auto.py checks the memory planner where memory is measured: it needs a CUDA GPU")
    tmp = Path(tempfile.mkdtemp(prefix="autopeft-pack-auto-"))
    backbone = random_large(tmp, args.tokenizer)
    runs = tmp / "runs"
    cmd = [sys.executable, "-m", "autopeft.cli", "search", "--task", "glue/sst2", "--backbone", backbone,
           "--out", str(runs), "--no-tracking", "--sampler", "random", "--pack-size", "auto",
           "--n-trials", str(args.n_trials), "--batch-size", str(args.batch_size), "--max-length",
           str(args.max_length), "--max-steps", str(args.max_steps), "--train-examples", "4000",
           "--heldout-examples", "200", "--eval-batch-size", "256"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", flush=True)
    if done.returncode != 0:
        sys.exit(f"autopeft search exited {done.returncode}")
    study = optuna.load_study(study_name="glue-sst2", storage=f"sqlite:///{runs / 'optuna.db'}")
    packs: dict[int, dict] = {}
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
        info = t.user_attrs.get("autopeft.pack")
        if info:
            packs[info["first"]] = info
    rows = [packs[k] for k in sorted(packs)]
    summary_line = next((line for line in done.stdout.splitlines() if "trials complete" in line), "")
    total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
    summary = {"pack_sizes": ",".join(str(r["size"]) for r in rows), "packs": len(rows),
               "first_pack_size": rows[0]["size"] if rows else 0,
               "largest_pack_size": max((r["size"] for r in rows), default=0),
               "max_peak_mb": max((r["peak_memory_mb"] for r in rows), default=0.0),
               "device_total_mb": total_mb,
               "max_peak_share_of_device": max((r["peak_memory_mb"] for r in rows), default=0.0) / total_mb,
               **{f"trials_{k.lower()}": v for k, v in states.items()}}
    write_results("pack_size_auto", rows, summary, args.out, device=torch.device("cuda"),
                  notes=f"autopeft search --pack-size auto, random roberta-large-size backbone, batch "
                        f"{args.batch_size} x {args.max_length}, {args.max_steps} steps per trial; rows: the "
                        f"study's autopeft.pack records; the search said: {summary_line}")


if __name__ == "__main__":
    main()
