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


#: where a profiled step's time goes, by kernel (CUDA) or aten op (CPU) name; the first category that matches wins
PROFILE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "attention": ("flash", "fmha", "attention", "sdpa", "softmax"),
    # AdamW fused or foreach (CUDA: multi_tensor_apply kernels) and clipping's norms; on a CPU, AdamW's
    # per-tensor ops carry no such name and count as "other"
    "optimizer": ("adam", "multi_tensor", "foreach", "normops", "linalg_vector_norm", "clip"),
    "gemm": ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "aten::mm", "aten::bmm", "aten::addmm",
             "aten::baddbmm"),
    "copy_cast": ("copy", "cast", "convert", "aten::to", "aten::_to_copy", "aten::clone", "aten::cat",
                  "index_select", "aten::index"),
}


def _category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in PROFILE_CATEGORIES.items() if any(k in low for k in keys)), "other")


def profile_step(fn: Callable[[], Any], steps: int = 3, top: int = 40, cuda: bool | None = None) -> dict[str, Any]:
    """Where one step's time goes, per step: device time by category and the top kernels on a GPU (the time
    the GPU is busy: if it is well under the step's wall time, the step is bound by the host), self time of the
    aten ops on a CPU. Why: a target missed must be explained by a profile, not guessed; this is that profile,
    rerunnable from the bench scripts (`--profile`). Run it on an eager step: a CUDA graph's replay hides its
    kernels from some profiler versions (`kernels_per_step` then says so: a graphed arm that shows none)."""
    from torch.profiler import ProfilerActivity, profile

    if cuda is None:  # a step on the GPU (as time_cuda decides)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        events = prof.events()
        return summarize_profile(device_rows(events), steps, top) | device_span(events, steps)
    rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.key.startswith("aten::")]
    return summarize_profile(rows, steps, top, clock="cpu self")


def device_span(events: Any, steps: int) -> dict[str, float]:
    """Per step: the device's span (first kernel's start to last kernel's end, over the profiled steps) and how
    many kernels, copies and memsets ran. Why: span minus busy is the time the GPU sat between kernels. In an
    eager step that is mostly the host launching; in a graph's replay, where the host is out of the way, it is
    the cost between kernels (a graphed roberta-large LoRA step: 36.7 ms busy of a 39.1 ms span, 4,002 kernels,
    kernels-h200-2026-11-30.json)."""

    spans = [e.time_range for e in events if _device_work(e)]
    if not spans:
        return {"span_ms": 0.0, "kernels_per_step": 0.0}
    return {"span_ms": (max(t.end for t in spans) - min(t.start for t in spans)) / 1e3 / steps,
            "kernels_per_step": len(spans) / steps}


def _device_work(e: Any) -> bool:
    """A kernel, copy or memset the GPU ran: a device-side event that is not a user annotation."""
    from torch.autograd import DeviceType

    return e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)


def device_rows(events: Any) -> list[tuple[str, float, int]]:
    """(name, µs, calls) per name of what the GPU itself ran: kernels, copies, memsets. Only device-side events:
    the CPU-side aten op that launched a kernel carries that kernel's time too (its self device time), so
    summing every event of `key_averages()` counts each kernel twice (the 2026-11-30 profiles did: "busy"
    came to about twice the step's device time). Nor do a `record_function` range's copies on the GPU timeline
    count ("Optimizer.step#AdamW.step", a user annotation): they span the kernels inside them, which count."""
    totals: dict[str, list[float]] = {}
    for e in events:
        if not _device_work(e):
            continue
        row = totals.setdefault(e.name, [0.0, 0])
        row[0] += e.time_range.elapsed_us()
        row[1] += 1
    return [(name, us, int(n)) for name, (us, n) in totals.items()]


def summarize_profile(rows: list[tuple[str, float, int]], steps: int, top: int = 15, clock: str = "device"
                      ) -> dict[str, Any]:
    """Per-step totals by category and the `top` heaviest names, from (name, µs over all steps, calls)."""
    by_cat = dict.fromkeys([*PROFILE_CATEGORIES, "other"], 0.0)
    ops = []
    for name, us, count in rows:
        if us <= 0:
            continue
        ms = us / 1e3 / steps
        by_cat[_category(name)] += ms
        ops.append({"name": name[:160], "ms": ms, "calls": count / steps, "category": _category(name)})
    ops.sort(key=lambda o: -o["ms"])
    return {"clock": clock, "busy_ms": sum(by_cat.values()), **{f"{c}_ms": v for c, v in by_cat.items()},
            "top": ops[:top]}


def format_profile(prof: dict[str, Any]) -> str:
    """`profile_step`'s figures on one line, for the bench scripts' logs."""
    cats = ", ".join(f"{c.removesuffix('_ms')} {v:.1f}" for c, v in prof.items()
                     if c.endswith("_ms") and c not in ("busy_ms", "span_ms"))
    span = (f" of a {prof['span_ms']:.1f} ms span, {prof['kernels_per_step']:.0f} kernels"
            if "span_ms" in prof else "")
    return f"profile ({prof['clock']}): busy {prof['busy_ms']:.1f} ms/step{span}: {cats}"


def write_results(bench: str, rows: list[dict], summary: dict[str, float], out_dir: str | Path = "bench/results",
                  notes: str = "", device: torch.device | str | None = None,
                  versions_of: dict[str, Any] | None = None) -> Path:
    """Write bench/results/<bench>-<device>-<YYYY-MM-DD>.json and print the summary last (what a reader of
    the log wants to see without scrolling). `versions_of`: the versions of the machine that measured, where
    that is not this one (a file merged from other results files)."""
    dev = device if isinstance(device, str) and not device.startswith(("cuda", "cpu")) else device_name(device)
    date = _dt.date.today().isoformat()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}-{dev}-{date}.json"
    record = {
        "bench": bench,
        "device": dev,
        "date": date,
        "versions": versions_of if versions_of is not None else versions(),
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
