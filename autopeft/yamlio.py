"""YAML in and out, safely: `safe_load` only, and errors that point at the line to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autopeft.errors import UserError


def load_yaml(path: str | Path, what: str = "config") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise UserError(f"{what} file {path} is not valid YAML at {where}: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{what} file {path} is not valid YAML: {exc}") from None


def dump_yaml(data: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
