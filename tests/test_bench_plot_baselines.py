"""bench/plot_baselines.py: the README's accuracy/size figure shows the comparison near full fine-tuning, and a
degenerate point (the head-only trial) stays on the figure without flattening it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from plot_baselines import WINDOW_POINTS, plot, y_window


def test_the_window_stops_a_few_points_under_full_fine_tuning() -> None:
    low, top = y_window([58.1, 84.6, 88.3], fft=89.0)
    assert (low, top) == (89.0 - WINDOW_POINTS, 90.0)
    assert y_window([86.0, 88.3], fft=89.0) == (85.0, 90.0)  # nothing far below: a point of margin
    assert y_window([70.0, 75.0], fft=None) == (69.0, 76.0)


def test_a_results_file_becomes_a_png(tmp_path: Path) -> None:
    def row(acc: float, params: int) -> dict:
        return {"acc": acc, "acc_sd": 0.003, "params": params, "params_pct": params / 1e5}

    means = {"full_ft": row(0.89, 22_000_000), "hf_ia3": row(0.846, 16_898), "autopeft_trial2": row(0.581, 770),
             "autopeft_trial164": row(0.883, 150_584)}
    results = tmp_path / "baselines-x.json"
    results.write_text(json.dumps({"bench": "baselines", "device": "h200", "date": "2026-11-30",
                                   "rows": [{"name": "means", "means": means}]}))
    png = plot(results, tmp_path / "out.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_studies_get_a_colour_each_and_only_their_front_is_labelled() -> None:
    """A merged file (one study per budget) has ~20 front points: each study is one legend entry, and only the
    points no other front point beats on accuracy and params carry a label."""
    from plot_baselines import front_names, groups, point_label

    means = {"hf_ia3": {"acc": 0.845, "params": 16_898}, "autopeft_a_trial3": {"acc": 0.85, "params": 16_000},
             "autopeft_a_trial9": {"acc": 0.84, "params": 16_500}, "autopeft_b_trial3": {"acc": 0.88, "params": 9e4}}
    named = {label: (set(rows), color) for label, rows, _, color in groups(means)}
    assert named["autopeft front, retrained: a"][0] == {"autopeft_a_trial3", "autopeft_a_trial9"}
    assert named["autopeft front, retrained: b"][0] == {"autopeft_b_trial3"}
    assert named["autopeft front, retrained: a"][1] != named["autopeft front, retrained: b"][1]
    assert front_names(means) == {"autopeft_a_trial3", "autopeft_b_trial3"}  # trial 9: more params, less accuracy
    assert [point_label(n) for n in ("autopeft_a_trial3", "autopeft_trial12", "hf_ia3")] == ["trial 3", "trial 12",
                                                                                            "ia3"]
