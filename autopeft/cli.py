"""Command line: argument parsing only; each verb calls one function elsewhere."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from autopeft.errors import UserError

EPILOG = "Exit codes: 0 done, 2 bad input, 1 anything else. Docs: README.md"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autopeft", description="Find the best PEFT configuration for a task.",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    t = sub.add_parser("train", help="train one configuration (YAML) and print its metrics")
    t.add_argument("--config", required=True, help="YAML with task, backbone, spec, fidelity (see README)")
    t.add_argument("--fidelity", choices=("search", "full"), default="search",
                   help="'full' trains on the whole train set (or the config's full_fidelity)")
    t.add_argument("--output", help="directory for autopeft.yaml, metrics.json and the trained weights")
    t.add_argument("--force", action="store_true", help="overwrite a non-empty --output directory")
    t.add_argument("--data-dir", help="local data root holding glue/<task>/{train,dev}.tsv "
                                      "(default: $AUTOPEFT_DATA_DIR, else the Hugging Face hub)")
    t.add_argument("--backbone", help="override the config's backbone: 'minilm', a local dir or a hub id")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                   help="fused Triton kernels: auto = on CUDA only")
    t.add_argument("--json", action="store_true", help="print only the metrics as JSON")

    s = sub.add_parser("search", help="search PEFT configurations for a task (multi-objective Bayesian optimisation)")
    s.add_argument("--task", required=True, help="glue/sst2, glue/cola, ... or 'file' with --train/--dev")
    s.add_argument("--study", help="study name (default: the task with / replaced by -)")
    s.add_argument("--out", default="autopeft-runs", help="embedded-default home: optuna.db, mlflow.db, artifacts/")
    s.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/optuna.db); PostgreSQL for many workers")
    s.add_argument("--space", help="search space: autopeft, lora, mixed, or a YAML file")
    s.add_argument("--backbone", help="'minilm' (packaged), a local model dir, or a hub id")
    s.add_argument("--n-trials", type=int, help="complete trials the study should have")
    s.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    s.add_argument("--sampler", choices=("botorch", "tpe", "nsga2", "random"))
    s.add_argument("--seed", type=int)
    s.add_argument("--max-params", help="constraint on trainable params: a count (50000) or a percentage (0.5%%)")
    s.add_argument("--max-memory", type=float, help="constraint on peak memory in MiB")
    s.add_argument("--resume", action="store_true", help="continue an existing study of this name")
    s.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    s.add_argument("--heldout-examples", type=int, help="size of the selection split carved from train")
    fid = s.add_argument_group("fidelity (overrides the preset's, per trial)")
    fid.add_argument("--train-examples", type=int, help="training examples per trial")
    fid.add_argument("--epochs", type=float)
    fid.add_argument("--max-steps", type=int, help="optimizer steps per trial (wins over --epochs)")
    fid.add_argument("--max-length", type=int, help="tokens per example")
    fid.add_argument("--batch-size", type=int)
    fid.add_argument("--lr", type=float, help="one learning rate for every method (default: per-method)")
    _data_flags(s)

    f = sub.add_parser("front", help="print the Pareto front of a study")
    f.add_argument("--study", required=True)
    f.add_argument("--out", help="the --out directory of the search (default: autopeft-runs)")
    f.add_argument("--storage", help="Optuna storage URL (instead of --out)")
    f.add_argument("--json", action="store_true", help="a JSON list of front trials")
    return p


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="local data root holding glue/<task>/{train,dev}.tsv "
                                      "(default: $AUTOPEFT_DATA_DIR, else the Hugging Face hub)")
    p.add_argument("--train", dest="train_file", help="--task file: training data (CSV, TSV, JSONL or parquet)")
    p.add_argument("--dev", dest="dev_file", help="--task file: evaluation data, same format")
    p.add_argument("--text-column", help="--task file: the text column")
    p.add_argument("--text-pair-column", help="--task file: a second text column for pair tasks")
    p.add_argument("--label-column", help="--task file: the label column")
    p.add_argument("--regression", action="store_true", default=None, help="--task file: numeric target")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.verb == "train":
            from autopeft.retrain import train_command

            train_command(args.config, fidelity=args.fidelity, output=args.output, data_dir=args.data_dir,
                          backbone=args.backbone, device=args.device, kernel_mode=args.kernels, force=args.force,
                          as_json=args.json)
        elif args.verb == "search":
            from autopeft.search import search_command

            overrides = {k: v for k, v in vars(args).items() if k not in ("verb", "task")}
            search_command(args.task, overrides)
        elif args.verb == "front":
            from autopeft.front import front_command

            front_command(args.study, out=args.out, storage=args.storage, as_json=args.json)
    except UserError as exc:
        print(f"autopeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autopeft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
