"""bench/tabular.py, small: a tiny table built on CPU, extended with --resume, and the fallback off train_pack."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_configs_are_distinct_seeded_prefix_stable_and_start_head_only() -> None:
    from tabular import table_configs

    from autopeft.search import spec_key
    from autopeft.space import SearchSpace

    space = SearchSpace.load("mixed")
    six = table_configs(space, 6, 40, seed=0)
    keys = [spec_key(space.decode(p, 6).to_dict()) for p in six]
    assert len(set(keys)) == 40
    assert space.decode(six[0], 6).to_dict() == {"num_layers": 6}  # head-only: every method off
    assert table_configs(space, 6, 12, seed=0) == six[:12]  # prefix-stable: --n can grow a table
    assert table_configs(space, 6, 12, seed=1) != six[:12]


@pytest.mark.slow
def test_tiny_table_is_built_then_resumed_with_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tabular

    import autopeft.packing

    out = tmp_path / "t.jsonl"
    common = ["--tiny", "--pack-size", "4", "--out", str(out), "--results", str(tmp_path / "res")]
    tabular.main([*common, "--n", "5"])
    meta, rows = tabular.read_table(out)
    assert meta["select"] == "heldout" and meta["num_layers"] == 2 and meta["fidelity"]["max_steps"] == 4
    assert meta["heldout_examples"] == 51  # the search's rule: min(500, len(train) // 5) of 256 examples
    assert sorted(r["index"] for r in rows) == list(range(5))
    assert all(r["path"] == "pack" and "failed" not in r for r in rows), rows
    for r in rows:
        assert 0.0 <= r["metric"] <= 1.0 and r["dev_metric"] is not None
        assert r["trainable_params"] > 0 and r["peak_memory_mb"] >= 0 and r["train_seconds"] >= 0
    assert rows[0]["spec"] == {"num_layers": 2}
    assert len(list((tmp_path / "res").glob("tabular_tiny-cpu-*.json"))) == 1

    with pytest.raises(Exception, match="--resume"):  # never appends to a table by accident
        tabular.main([*common, "--n", "6"])

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("pack broke")

    monkeypatch.setattr(autopeft.packing, "train_pack", broken)
    tabular.main([*common, "--n", "6", "--resume"])
    meta2, rows2 = tabular.read_table(out)
    assert meta2 == meta
    assert sorted(r["index"] for r in rows2) == list(range(6))  # only the missing configuration was trained
    assert rows2[:5] == rows
    assert rows2[5]["path"] == "single" and "failed" not in rows2[5]
    assert any("meta_resume" in json.loads(line) for line in out.read_text().splitlines())
