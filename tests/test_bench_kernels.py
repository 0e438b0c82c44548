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
