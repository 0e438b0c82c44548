"""A user's own files: every format, labels of any type, regression, and one clear line for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from autopeft.errors import UserError
from autopeft.tasks import load_task

ROWS = [{"q": "is it good", "a": "yes very", "y": "pos"}, {"q": "is it bad", "a": "no", "y": "neg"},
        {"q": "well?", "a": "fine", "y": "neutral"}]


def write(path: Path, rows: list[dict]) -> Path:
    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_format_with_a_text_pair(tmp_path: Path, ext: str) -> None:
    f = write(tmp_path / f"d{ext}", ROWS)
    data = load_task("file", train_file=str(f), dev_file=str(f), text_column="q", text_pair_column="a",
                     label_column="y")
    assert data.label_names == ["neg", "neutral", "pos"] and data.num_labels == 3
    assert data.train.label == [2, 0, 1] and data.train.text_pair == ["yes very", "no", "fine"]
    assert data.metric_name == "accuracy" and not data.is_regression


def test_numeric_labels_sort_numerically_and_regression_reads_floats(tmp_path: Path) -> None:
    rows = [{"t": "a", "y": 10}, {"t": "b", "y": 2}, {"t": "c", "y": 1}]
    f = write(tmp_path / "n.jsonl", rows)
    cls = load_task("file", train_file=str(f), dev_file=str(f), text_column="t", label_column="y")
    assert cls.label_names == ["1", "2", "10"] and cls.train.label == [2, 1, 0]
    reg = load_task("file", train_file=str(f), dev_file=str(f), text_column="t", label_column="y", regression=True)
    assert reg.is_regression and reg.num_labels == 1 and reg.train.label == [10.0, 2.0, 1.0]
    assert reg.metric_name == "pearson"


@pytest.mark.parametrize(("change", "message"), [
    ({"train_file": "missing.csv"}, "missing.csv does not exist"),
    ({"label_column": "stars"}, "'stars'.*columns are"),
    ({"text_column": None}, "--text-column"),
    ({"train_file": "d.txt"}, "unknown format"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, change: dict, message: str) -> None:
    f = write(tmp_path / "d.csv", ROWS)
    (tmp_path / "d.txt").write_text("x")
    kw = {"train_file": str(f), "dev_file": str(f), "text_column": "q", "label_column": "y"}
    kw.update({k: (str(tmp_path / v) if k.endswith("file") else v) for k, v in change.items()})
    with pytest.raises(UserError, match=message) as e:
        load_task("file", **kw)
    assert "\n" not in str(e.value)


def test_dev_labels_unseen_in_train_are_refused(tmp_path: Path) -> None:
    train = write(tmp_path / "t.csv", ROWS[:2])
    dev = write(tmp_path / "d.csv", ROWS)
    with pytest.raises(UserError, match="neutral"):
        load_task("file", train_file=str(train), dev_file=str(dev), text_column="q", label_column="y")
