"""What every benchmark shares: device naming, library versions, timing, and one result-file format.

A number is only worth keeping with what produced it, so every result file carries the device, the
versions, the exact command and the date, and lands at bench/results/<bench>-<device>-<date>.json where
runs on different machines or days never overwrite each other.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def device_name(device: torch.device | str | None = None) -> str:
    """A short slug of the accelerator ("h100", "h200", "a100", "cpu"), for file names and result keys."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    for known in ("h200", "h100", "a100", "l40s", "l4", "a10g", "v100", "t4", "b200", "gb200"):
        if re.search(rf"\b{known}\b", name) or known in name.replace(" ", ""):
            return known
    return re.sub(r"[^a-z0-9]+", "-", name.replace("nvidia", "")).strip("-") or "cuda"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "autopeft": _version("autopeft"),
    }


def time_cuda(fn: Callable[[], Any], warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of `fn()`; CUDA events on a GPU (a step's asynchronous kernels are counted, the
    launch loop's host time is not hidden), perf_counter elsewhere. The median resists the odd slow step."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def write_results(bench: str, rows: list[dict], summary: dict[str, float], out_dir: str | Path = "bench/results",
                  notes: str = "", device: torch.device | str | None = None) -> Path:
    """Write bench/results/<bench>-<device>-<YYYY-MM-DD>.json and print the summary last (what a reader of
    the log wants to see without scrolling)."""
    dev = device if isinstance(device, str) and not device.startswith(("cuda", "cpu")) else device_name(device)
    date = _dt.date.today().isoformat()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}-{dev}-{date}.json"
    record = {
        "bench": bench,
        "device": dev,
        "date": date,
        "versions": versions(),
        "command": " ".join(sys.argv),
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    print("summary:")
    for k, v in summary.items():
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    return path
