"""The load bench, small: 4 workers x 100 trials of the fast stand-in objective on a real PostgreSQL."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_four_workers_hundred_trials_no_error_none_lost_or_duplicated(postgres_url: str) -> None:
    from load import run_load

    rows, summary = run_load(postgres_url, workers=4, trials=100, sleep_s=0.002)
    assert summary["storage_errors"] == 0, rows
    assert summary["lost_trials"] == 0 and summary["duplicate_trials"] == 0, summary
    assert summary["complete_trials"] == 100 and summary["trials_per_s"] > 0
    assert all(r["exit_code"] == 0 for r in rows)
    assert sum(r["complete"] for r in rows) == 100  # every worker's own count adds up to the study's
