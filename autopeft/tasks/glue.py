"""The GLUE tasks: from a local directory in GLUE's own file layout, or from the hub through `datasets`.

Local files are read with `csv` and QUOTE_NONE, as GLUE's own loaders do: GLUE sentences contain bare
quote characters, and a quoting-aware reader would silently merge rows.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from autopeft.errors import UserError
from autopeft.tasks.data import Split, TaskData


@dataclass(frozen=True)
class GlueTask:
    name: str
    metric: str
    num_labels: int  # 1 = regression
    label_names: tuple[str, ...]
    hub_columns: tuple[str, str | None]  # text, text pair in the hub's `glue` dataset
    tsv_columns: tuple[str | int, str | int | None, str | int]  # text, pair, label: header names or indices
    header: bool = True
    dev_files: tuple[str, ...] = ("dev.tsv",)
    hub_dev: str = "validation"


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", "matthews", 2, ("unacceptable", "acceptable"), ("sentence", None), (3, None, 1), header=False),
    GlueTask("sst2", "accuracy", 2, ("negative", "positive"), ("sentence", None), ("sentence", None, "label")),
    GlueTask("mrpc", "f1", 2, ("not_equivalent", "equivalent"), ("sentence1", "sentence2"),
             ("#1 String", "#2 String", "Quality")),
    GlueTask("qqp", "f1", 2, ("not_duplicate", "duplicate"), ("question1", "question2"),
             ("question1", "question2", "is_duplicate")),
    GlueTask("stsb", "pearson", 1, (), ("sentence1", "sentence2"), ("sentence1", "sentence2", "score")),
    GlueTask("mnli", "accuracy", 3, ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
             ("sentence1", "sentence2", "gold_label"), dev_files=("dev_matched.tsv", "dev.tsv"),
             hub_dev="validation_matched"),
    GlueTask("qnli", "accuracy", 2, ("entailment", "not_entailment"), ("question", "sentence"),
             ("question", "sentence", "label")),
    GlueTask("rte", "accuracy", 2, ("entailment", "not_entailment"), ("sentence1", "sentence2"),
             ("sentence1", "sentence2", "label")),
    GlueTask("wnli", "accuracy", 2, ("not_entailment", "entailment"), ("sentence1", "sentence2"),
             ("sentence1", "sentence2", "label")),
)}

#: local directory names people use for the same task (GLUE's download script writes SST-2, CoLA, ...)
DIR_ALIASES = {"sst2": ("sst2", "SST-2"), "cola": ("cola", "CoLA"), "mrpc": ("mrpc", "MRPC"), "qqp": ("qqp", "QQP"),
               "stsb": ("stsb", "STS-B"), "mnli": ("mnli", "MNLI"), "qnli": ("qnli", "QNLI"), "rte": ("rte", "RTE"),
               "wnli": ("wnli", "WNLI")}


def _label(task: GlueTask, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if task.num_labels == 1:
        try:
            return float(raw)
        except ValueError:
            raise UserError(f"{where}: label {raw!r} is not a number (STS-B scores are 0-5)") from None
    if raw.isdigit() and int(raw) < task.num_labels:
        return int(raw)
    if raw in task.label_names:
        return task.label_names.index(raw)
    raise UserError(f"{where}: label {raw!r} is not one of 0..{task.num_labels - 1} or {list(task.label_names)}")


def read_glue_tsv(task: GlueTask, path: Path) -> Split:
    csv.field_size_limit(sys.maxsize)
    text_col, pair_col, label_col = task.tsv_columns
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task.header:
        if not rows:
            raise UserError(f"{path} is empty; expected GLUE's {task.name} layout with a header row")
        header = rows.pop(0)
        missing = [c for c in (text_col, pair_col, label_col) if c is not None and c not in header]
        if missing:
            raise UserError(f"{path}: column(s) {missing} not in its header {header}; "
                            f"expected GLUE's {task.name} layout")
        ti, pi, li = (None if c is None else header.index(c) for c in (text_col, pair_col, label_col))
    else:
        ti, pi, li = text_col, pair_col, label_col
    width = max(i for i in (ti, pi, li) if i is not None) + 1
    text, pair, label = [], [], []
    for n, row in enumerate(rows, start=2 if task.header else 1):
        if not row or row == [""]:
            continue
        if len(row) < width:
            raise UserError(f"{path} line {n}: {len(row)} columns, expected at least {width} (GLUE {task.name} layout)")
        text.append(row[ti])
        if pi is not None:
            pair.append(row[pi])
        label.append(_label(task, row[li], f"{path} line {n}"))
    if not text:
        raise UserError(f"{path} has no examples")
    return Split(text, label, pair if pi is not None else None)


def find_task_dir(name: str, data_dir: Path) -> Path | None:
    for base in (data_dir / "glue", data_dir):
        for alias in DIR_ALIASES[name]:
            if (base / alias / "train.tsv").is_file():
                return base / alias
    return None


def load_glue_local(name: str, task_dir: Path) -> TaskData:
    task = GLUE_TASKS[name]
    dev = next((task_dir / f for f in task.dev_files if (task_dir / f).is_file()), None)
    if dev is None:
        raise UserError(f"{task_dir} has train.tsv but no {' or '.join(task.dev_files)}")
    return _task_data(task, read_glue_tsv(task, task_dir / "train.tsv"), read_glue_tsv(task, dev), f"local:{task_dir}")


def load_glue_hub(name: str) -> TaskData:
    """GLUE from the Hugging Face hub (`nyu-mll/glue`), for machines without a local copy."""
    task = GLUE_TASKS[name]
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as e:  # offline, no cache, hub down: all the same advice
        raise UserError(f"could not load glue/{name} from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}); pass --data-dir DIR or set AUTOPEFT_DATA_DIR to a "
                        f"directory holding glue/{name}/train.tsv") from None

    def split(part: str) -> Split:
        d = ds[part]
        tc, pc = task.hub_columns
        labels = [float(x) for x in d["label"]] if task.num_labels == 1 else [int(x) for x in d["label"]]
        return Split(list(d[tc]), labels, list(d[pc]) if pc else None)

    return _task_data(task, split("train"), split(task.hub_dev), "hub:nyu-mll/glue")


def _task_data(task: GlueTask, train: Split, dev: Split, source: str) -> TaskData:
    return TaskData(name=f"glue/{task.name}", train=train, dev=dev, num_labels=task.num_labels,
                    label_names=list(task.label_names), metric_name=task.metric, is_regression=task.num_labels == 1,
                    source=source)
