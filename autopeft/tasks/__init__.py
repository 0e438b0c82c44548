"""Task registry: every GLUE task (local GLUE layout or the hub) and a user's own files; a metric per task."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from autopeft.errors import UserError
from autopeft.tasks.data import Split, TaskData, holdout_split
from autopeft.tasks.files import load_file_task
from autopeft.tasks.glue import GLUE_TASKS, find_task_dir, load_glue_hub, load_glue_local
from autopeft.tasks.metrics import compute_metrics

DATA_DIR_ENV = "AUTOPEFT_DATA_DIR"


def known_tasks() -> list[str]:
    return [f"glue/{name}" for name in GLUE_TASKS] + ["file"]


def resolve_data_dir(flag: str | None) -> Path | None:
    """--data-dir, else $AUTOPEFT_DATA_DIR, else None (the hub)."""
    value = flag or os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "--data-dir" if flag else f"${DATA_DIR_ENV}"
        raise UserError(f"data directory {path} ({source}) does not exist")
    return path


def normalise_task(name: str) -> str:
    """'glue/sst2', 'sst2', 'glue/SST-2' -> 'glue/sst2'; 'file' stays; anything else is a UserError."""
    key = name.strip().lower().replace("-", "")
    if key in ("file", "csv"):
        return "file"
    key = key.removeprefix("glue/")
    if key in GLUE_TASKS:
        return f"glue/{key}"
    close = difflib.get_close_matches(name, known_tasks(), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(f"unknown task {name!r}; {hint}known tasks: {', '.join(known_tasks())}")


def load_task(name: str, data_dir: Path | str | None = None, *, train_file: str | None = None,
              dev_file: str | None = None, text_column: str | None = None, text_pair_column: str | None = None,
              label_column: str | None = None, regression: bool = False) -> TaskData:
    """Load a task's train and dev splits. A GLUE task is read from `data_dir` when it holds the task (GLUE's
    layout: DIR/glue/<task>/train.tsv), otherwise from the hub; `file` reads the user's files."""
    task = normalise_task(name)
    if task == "file" or train_file:
        if task != "file":
            raise UserError(f"--train/--dev are for --task file, not {task}")
        return load_file_task(train_file, dev_file, text_column, text_pair_column, label_column, regression)
    short = task.removeprefix("glue/")
    if data_dir is not None:
        found = find_task_dir(short, Path(data_dir))
        if found is not None:
            return load_glue_local(short, found)
    return load_glue_hub(short)


__all__ = ["DATA_DIR_ENV", "GLUE_TASKS", "Split", "TaskData", "compute_metrics", "holdout_split", "known_tasks",
           "load_task", "normalise_task", "resolve_data_dir"]
