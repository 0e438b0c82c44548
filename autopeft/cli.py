"""Command line: argument parsing only; each verb calls one function elsewhere."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from autopeft.errors import UserError
from autopeft.spec import CUDA_GRAPH_MODES

EPILOG = "Exit codes: 0 done, 2 bad input, 1 anything else. Docs: README.md"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autopeft", description="Find the best PEFT configuration for a task.",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    t = sub.add_parser("train", help="train one configuration (YAML) and print its metrics")
    t.add_argument("--config", required=True, help="YAML with task, backbone, spec, fidelity (see README)")
    t.add_argument("--fidelity", choices=("search", "full"), default="search",
                   help="'search' (default): the config's fidelity, as the search trained it; 'full': the config's "
                        "full_fidelity, else the whole train set for max(3, epochs) epochs without a step cap")
    t.add_argument("--output", help="directory for the export layout: autopeft.yaml, weights, metrics.json, "
                                    "README.md, and an HF PEFT adapter where HF can express the spec")
    t.add_argument("--force", action="store_true", help="overwrite a non-empty --output directory")
    t.add_argument("--data-dir", help="local data root holding glue/<task>/{train,dev}.tsv "
                                      "(default: $AUTOPEFT_DATA_DIR, else the Hugging Face hub)")
    t.add_argument("--backbone", help="override the config's backbone: 'minilm', a local dir or a hub id")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                   help="Triton kernels: on, off (PyTorch reference), auto = the faster per op as measured")
    t.add_argument("--cuda-graphs", choices=CUDA_GRAPH_MODES,
                   help="the training step as a CUDA graph: auto (default: on CUDA where the model captures), "
                        "on, off; overrides the config's fidelity.cuda_graphs")
    t.add_argument("--json", action="store_true", help="print only the metrics as JSON")

    s = sub.add_parser("search", help="search PEFT configurations for a task (multi-objective Bayesian optimisation)")
    s.add_argument("--task", required=True, help="glue/sst2, glue/cola, ... or 'file' with --train/--dev")
    s.add_argument("--study", help="study name (default: the task with / replaced by -)")
    s.add_argument("--out", default="autopeft-runs", help="embedded-default home: optuna.db, mlflow.db, artifacts/")
    s.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/optuna.db); PostgreSQL for many "
                                     "workers")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db); an http:// server "
                                         "to share")
    s.add_argument("--experiment", help="MLflow experiment name (default: autopeft/TASK)")
    s.add_argument("--no-tracking", dest="tracking", action="store_false", default=None,
                   help="do not log to MLflow (the study itself is unaffected)")
    s.add_argument("--space", help="search space: autopeft, lora, mixed, or a YAML file")
    s.add_argument("--backbone", help="'minilm' (packaged), a local model dir, or a hub id")
    s.add_argument("--n-trials", type=int, help="complete trials the study should have")
    s.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    s.add_argument("--sampler", choices=("botorch", "tpe", "nsga2", "random"))
    s.add_argument("--seed", type=int)
    s.add_argument("--max-params", help="constraint on trainable params: a count (50000) or a percentage (0.5%%); "
                                        "a proposal over it is refused untrained (FAILED over_max_params)")
    s.add_argument("--max-memory", type=float, help="constraint on peak memory in MiB")
    s.add_argument("--objectives", type=_objectives,
                   help="comma-separated: metric plus any of params, memory (default: the preset's, all three)")
    s.add_argument("--n-startup-trials", type=int, help="random trials before the sampler's model takes over")
    s.add_argument("--resume", action="store_true", help="continue an existing study of this name")
    s.add_argument("--workers", type=int, help="run N `autopeft worker` processes here: one per GPU (round robin "
                                               "over CUDA_VISIBLE_DEVICES) on CUDA, else N CPU workers")
    s.add_argument("--proposal-batch", type=int, help="BoTorch configurations chosen per GP fit (a q-batch); the "
                                                      "others wait in the study for the next trials")
    s.add_argument("--pack-size", help="train up to K trials at once on one shared frozen backbone, or `auto`: as "
                                       "many as the GPU's memory holds, up to 8 (estimated, then measured per pack; "
                                       "1 on CPU) (default: the preset's gpu_pack_size on a GPU, 1 on CPU)")
    s.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    s.add_argument("--heldout-examples", type=int, help="size of the selection split carved from train")
    fid = s.add_argument_group("fidelity (overrides the preset's, per trial)")
    fid.add_argument("--train-examples", type=int, help="training examples per trial")
    fid.add_argument("--epochs", type=float)
    fid.add_argument("--max-steps", type=int, help="optimizer steps per trial (wins over --epochs)")
    fid.add_argument("--max-length", type=int, help="tokens per example")
    fid.add_argument("--batch-size", type=int)
    fid.add_argument("--eval-batch-size", type=int, help="batch size of the held-out and dev evaluation")
    fid.add_argument("--lr", type=float, help="one learning rate for every method (default: per-method)")
    fid.add_argument("--cuda-graphs", choices=CUDA_GRAPH_MODES,
                     help="each trial's training step as a CUDA graph: auto (on CUDA where the model captures, "
                          "else eager), on (a capture failure fails the trial), off")
    _data_flags(s)

    f = sub.add_parser("front", help="print the Pareto front of a study")
    f.add_argument("--study", required=True)
    f.add_argument("--out", help="the --out directory of the search (default: autopeft-runs)")
    f.add_argument("--storage", help="Optuna storage URL (instead of --out)")
    f.add_argument("--json", action="store_true", help="a JSON list of front trials")

    e = sub.add_parser("export", help="write a trial's trained adapter as an HF PEFT dir + autopeft.yaml + model card",
                       description="Export one COMPLETE trial from its saved weights (no retraining): autopeft.yaml "
                                   "and weights (autopeft.load), an HF PEFT adapter dir where HF PEFT can express "
                                   "the spec, an AdapterHub `adapters` dir (DEST/adapterhub/) where that library "
                                   "can, README.md and metrics.json. Prints which formats were written and why "
                                   "others were not.", epilog=EPILOG)
    e.add_argument("dest", nargs="?", metavar="DEST", help="the directory to write (must not exist or be empty)")
    e.add_argument("--study", required=True)
    e.add_argument("--out", help="the --out directory of the search (default: autopeft-runs)")
    e.add_argument("--storage", help="Optuna storage URL (instead of --out)")
    e.add_argument("--trial", type=int, help="the trial number to export (see autopeft front)")
    e.add_argument("--pick", nargs="+", metavar="RULE",
                   help="choose the trial instead: 'best-metric' or 'smallest-within X' (fewest params on the front "
                        "within X points of its best metric)")
    e.add_argument("--format", dest="formats", choices=("auto", "hf", "autopeft", "adapters"), default="auto",
                   help="auto (default): autopeft always, HF PEFT and AdapterHub each where it can express the "
                        "spec exactly; hf / adapters: fail unless HF PEFT / AdapterHub can; autopeft: ours only")
    e.add_argument("--force", action="store_true", help="replace a non-empty DEST")

    w = sub.add_parser("worker", help="join a study on a shared storage: ask for trials, train them, tell results",
                       epilog=EPILOG)
    w.add_argument("--study", required=True, help="the study's name (made by `autopeft search --storage URL`)")
    w.add_argument("--storage", help="Optuna storage URL, e.g. postgresql+psycopg2://user:pw@host/db "
                                     "(default: $AUTOPEFT_STORAGE)")
    w.add_argument("--tracking-uri", help="MLflow tracking URI (default: $AUTOPEFT_TRACKING_URI, else the study's)")
    w.add_argument("--out", help="local home for trial weights (default: the study's --out)")
    w.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    w.add_argument("--grace", type=float, default=60.0,
                   help="on SIGTERM, seconds the running trial may take to finish before it is failed (default 60)")
    w.add_argument("--timeout", type=float, help="stop starting trials after this many seconds (a running one "
                                                 "finishes)")

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for a study's tracking store")
    u.add_argument("--out", help="the --out directory of the search (default: autopeft-runs)")
    u.add_argument("--tracking-uri", help="an MLflow backend store URI instead of --out")
    u.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    return p


def _objectives(text: str) -> tuple[str, ...]:
    """Split here only: which names are valid is checked once, with the preset's, in search.options_from_preset."""
    return tuple(o.strip() for o in text.split(",") if o.strip())


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
                          as_json=args.json, cuda_graphs=args.cuda_graphs)
        elif args.verb == "search":
            from autopeft.search import search_command

            overrides = {k: v for k, v in vars(args).items() if k not in ("verb", "task")}
            search_command(args.task, overrides)
        elif args.verb == "front":
            from autopeft.front import front_command

            front_command(args.study, out=args.out, storage=args.storage, as_json=args.json)
        elif args.verb == "export":
            from autopeft.export import export_command

            export_command(args.study, dest=args.dest, out=args.out, storage=args.storage, trial=args.trial,
                           pick=args.pick, force=args.force, formats=args.formats)
        elif args.verb == "worker":
            from autopeft.worker import worker_command

            worker_command(args.study, storage=args.storage, tracking_uri=args.tracking_uri, out=args.out,
                           device=args.device, grace=args.grace, timeout=args.timeout)
        elif args.verb == "ui":
            from autopeft.ui import ui_command

            ui_command(out=args.out, tracking_uri=args.tracking_uri, port=args.port)
    except UserError as exc:
        print(f"autopeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autopeft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
