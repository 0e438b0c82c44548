"""bench/packing.py's accuracy check: the packed arm's mean accuracy against each other arm's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_mean_acc_diffs_compare_arms_over_the_same_trials() -> None:
    """Per-trial gaps of opposite sign cancel in the mean (seed noise); a trial one arm lacks (failed) is left
    out of both means; an arm that did not run gets no key."""
    from packing import mean_acc_diffs

    rows = [{"arm": "packed", "trial": 0, "metric": 0.90}, {"arm": "packed", "trial": 1, "metric": 0.80},
            {"arm": "packed", "trial": 2, "metric": 0.50},
            {"arm": "hf_peft", "trial": 0, "metric": 0.88}, {"arm": "hf_peft", "trial": 1, "metric": 0.81},
            {"arm": "unpacked", "trial": 0, "metric": 0.90}, {"arm": "unpacked", "trial": 1, "failed": "nan"},
            {"arm": "packed", "pack": 0, "tokens": 10}]  # a pack's own row: no trial
    got = mean_acc_diffs(rows)
    assert got == {"mean_acc_diff_points_vs_hf_peft": pytest.approx(0.5),  # (2 - 1) / 2 points
                   "mean_acc_diff_points_vs_unpacked": pytest.approx(0.0)}


def test_rerun_acc_diffs_take_the_largest_gap_between_two_runs_of_the_same_trials() -> None:
    """How far single trials move between eager and graphed runs of the same code: the largest gap, not the
    mean (gaps of opposite sign must not cancel); a pair with an arm that did not run gets no key."""
    from packing import rerun_acc_diffs

    rows = [{"arm": "hf_peft", "trial": 0, "metric": 0.80}, {"arm": "hf_peft", "trial": 1, "metric": 0.85},
            {"arm": "hf_peft_graphed", "trial": 0, "metric": 0.82}, {"arm": "hf_peft_graphed", "trial": 1,
                                                                      "metric": 0.84},
            {"arm": "packed", "trial": 0, "metric": 0.80}]
    got = rerun_acc_diffs(rows)
    assert got == {"max_acc_diff_points_hf_peft_vs_hf_peft_graphed": pytest.approx(2.0)}
