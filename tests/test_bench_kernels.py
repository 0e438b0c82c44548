"""bench/kernels.py's command line: a misspelt arm is refused up front, not silently left out of a GPU run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"


@pytest.mark.parametrize("flag", ["--only", "--only-llama", "--profile"])
def test_unknown_arm_is_one_line_exit_2(flag: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", flag, "floor,ours_lora9", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"{flag}: unknown arm(s) ours_lora9" in done.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def _load_kernels_bench(monkeypatch: pytest.MonkeyPatch):
    """bench/kernels.py as a module (it takes its own folder off sys.path only when run as the script, see its
    top); sys.path and sys.modules are restored after the test all the same."""
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernels", mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_ratios_over_the_best_floor_take_each_sides_faster_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """An eager floor slowed by its host must not flatter a graphed arm: figures of one H200 run, 2026-11-30."""
    kb = _load_kernels_bench(monkeypatch)
    rows = [{"model": "roberta", "method": m, "step_ms": v} for m, v in
            [("floor", 26.78), ("floor_graphed", 28.23), ("ours_lora8_all", 87.84), ("ours_lora8_all_graphed", 38.27),
             ("ours_ia3", 40.0)]]
    summary = kb.summarize(rows)
    assert summary["roberta_large_best_floor_ms"] == 26.78
    assert summary["roberta_large_lora_r8_all_x_best_floor"] == pytest.approx(38.27 / 26.78)
    assert summary["roberta_large_ia3_x_best_floor"] == pytest.approx(40.0 / 26.78)  # eager only: its one way
    assert "roberta_large_adapter64_x_best_floor" not in summary  # not run
    slow_host = kb.summarize([{**r, "step_ms": 36.1} if r["method"] == "floor" else r for r in rows])
    assert slow_host["roberta_large_lora_r8_all_x_best_floor"] == pytest.approx(38.27 / 28.23)
    # the keys: our step as the trainer runs it over the floor's faster way; eager over eager beside them
    assert summary["roberta_large_lora_r8_all_x_floor"] == summary["roberta_large_lora_r8_all_x_best_floor"]
    assert summary["roberta_large_lora_r8_all_ms"] == 38.27
    assert summary["roberta_large_eager_lora_r8_all_x_floor"] == pytest.approx(87.84 / 26.78)
    assert summary["roberta_large_eager_lora_r8_all_ms"] == 87.84
    assert summary["roberta_large_ia3_x_floor"] == pytest.approx(40.0 / 26.78)
    assert "roberta_large_adapter64_x_floor" not in summary
