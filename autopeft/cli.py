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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.verb == "train":
            from autopeft.retrain import train_command

            train_command(args.config, fidelity=args.fidelity, output=args.output, data_dir=args.data_dir,
                          backbone=args.backbone, device=args.device, kernel_mode=args.kernels, force=args.force,
                          as_json=args.json)
    except UserError as exc:
        print(f"autopeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autopeft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
