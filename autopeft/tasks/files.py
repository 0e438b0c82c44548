"""A user's own data: CSV, TSV, JSONL or parquet files with named text and label columns.

Labels may be of any type for classification (strings, ints, bools): they are mapped to ids in sorted
order of the training labels, and the names kept so predictions can be read back. `regression=True` reads
them as numbers instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from autopeft.errors import UserError
from autopeft.tasks.data import Split, TaskData

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def read_table(path: Path) -> Any:
    """A pandas DataFrame with every column as read (strings stay strings: no type guessing on text)."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"data file {path} does not exist; check --train/--dev")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"data file {path}: unknown format {path.suffix!r}; use one of {sorted(FORMATS)}")
    try:
        if fmt == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if fmt == "tsv":
            return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except UserError:
        raise
    except Exception as e:  # a parse error of any kind is the user's file
        raise UserError(f"data file {path} could not be read as {fmt}: {str(e).splitlines()[0][:200]}") from None


def _column(df: Any, path: Path, name: str | None, flag: str) -> list[Any] | None:
    if name is None:
        return None
    if name not in df.columns:
        raise UserError(f"column {name!r} ({flag}) not in {path}; its columns are {list(map(str, df.columns))}")
    return df[name].tolist()


def load_file_task(train_file: str | None, dev_file: str | None, text_column: str | None,
                   text_pair_column: str | None, label_column: str | None, regression: bool = False) -> TaskData:
    missing = [flag for flag, v in (("--train", train_file), ("--dev", dev_file), ("--text-column", text_column),
                                    ("--label-column", label_column)) if not v]
    if missing:
        raise UserError(f"--task file needs {', '.join(missing)} (a CSV/TSV/JSONL/parquet file with named columns)")
    paths = Path(train_file), Path(dev_file)  # type: ignore[arg-type]
    raw = []
    for path in paths:
        df = read_table(path)
        if len(df) == 0:
            raise UserError(f"data file {path} has no rows")
        text = _column(df, path, text_column, "--text-column")
        pair = _column(df, path, text_pair_column, "--text-pair-column")
        labels = _column(df, path, label_column, "--label-column")
        raw.append((path, [str(t) for t in text], None if pair is None else [str(t) for t in pair], labels))

    if regression:
        def conv(path: Path, labels: list[Any]) -> list[float]:
            out = []
            for i, v in enumerate(labels):
                try:
                    x = float(v)
                except (TypeError, ValueError):
                    x = math.nan
                if not math.isfinite(x):
                    raise UserError(f"{path} row {i + 1}: label {v!r} is not a finite number (--regression)")
                out.append(x)
            return out
        names: list[str] = []
        splits = [Split(t, conv(p, y), tp) for p, t, tp, y in raw]
        num_labels, metric = 1, "pearson"
    else:
        names = sorted({str(v) for v in raw[0][3]}, key=_natural)
        if len(names) < 2:
            raise UserError(f"{raw[0][0]}: label column {label_column!r} has {len(names)} distinct value(s); "
                            f"classification needs at least 2 (use --regression for numeric targets)")
        index = {n: i for i, n in enumerate(names)}
        splits = []
        for p, t, tp, y in raw:
            unknown = sorted({str(v) for v in y} - index.keys())
            if unknown:
                raise UserError(f"{p}: labels {unknown[:5]} never occur in the training file {raw[0][0]}")
            splits.append(Split(t, [index[str(v)] for v in y], tp))
        num_labels, metric = len(names), "accuracy"
    return TaskData(name="file", train=splits[0], dev=splits[1], num_labels=num_labels, label_names=names,
                    metric_name=metric, is_regression=regression,
                    source=f"file:{paths[0].resolve()}:{paths[1].resolve()}:{text_column}:{text_pair_column}:{label_column}")


def _natural(s: str) -> tuple:
    """Numbers in numeric order ("2" < "10"), then everything else alphabetically."""
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)
