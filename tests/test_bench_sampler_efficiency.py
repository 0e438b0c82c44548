"""bench/sampler_efficiency.py: the nearest-row lookup, the hypervolume curve and trials-to-target, on a
synthetic table (no training), plus one quick replay."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

LAYERS = 2


@pytest.fixture(scope="module")
def table_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 configurations of the mixed space with made-up measurements; row 3 failed."""
    from tabular import table_configs

    from autopeft.peft import ModelDims, peft_param_count
    from autopeft.space import SearchSpace

    space = SearchSpace.load("mixed")
    dims = ModelDims("bert", LAYERS, hidden=32, intermediate=64, num_heads=4, num_kv_heads=4, head_dim=8)
    rng = np.random.default_rng(0)
    lines = [json.dumps({"meta": {"space": "mixed", "num_layers": LAYERS, "task": "file", "backbone": "synthetic"}})]
    for i, params in enumerate(table_configs(space, LAYERS, 30, seed=0)):
        spec = space.decode(params, LAYERS)
        row: dict = {"index": i, "params": params, "spec": spec.to_dict()}
        if i == 3:
            row |= {"failed": "oom"}
        else:
            n = 66 + peft_param_count(spec, dims)
            row |= {"metric": float(rng.uniform(0.5, 0.9)), "trainable_params": n,
                    "peak_memory_mb": float(100 + rng.uniform(0, 50))}
        lines.append(json.dumps(row))
    path = tmp_path_factory.mktemp("table") / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_row_looks_itself_up_and_aliases_hit_the_canonical_row(table_path: Path) -> None:
    from sampler_efficiency import Table

    table = Table.load(table_path)
    assert len(table.rows) == 30
    for i, r in enumerate(table.rows):
        assert table.lookup(r["params"]) == i
    # every layer bit off: head-only whatever the sizes say, so it is row 0 (the head-only row) exactly
    alias = dict(table.rows[5]["params"]) | {f"layer.{i}": 0 for i in range(LAYERS)}
    assert table.lookup(alias) == 0
    assert np.isnan(table.objectives[3]).all()  # the failed row
    ok = np.isfinite(table.points).all(axis=1)
    assert np.allclose(table.points[ok].min(axis=0), 0) and np.allclose(table.points[ok].max(axis=0), 1)


def test_a_proposal_outside_the_table_hits_its_nearest_row(table_path: Path) -> None:
    from sampler_efficiency import Table, canonical, encode_params

    table = Table.load(table_path)
    params = dict(table.rows[7]["params"])
    name = "prefix.length.index"
    params[name] = (params[name] + 1) % 7  # one rung away: a configuration the table (most likely) lacks
    hit = table.lookup(params)
    x = encode_params(canonical(table.space, params, LAYERS), table.distributions)
    dists = ((table.x - x) ** 2).sum(axis=1)
    assert dists[hit] == dists.min()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=3, max_size=3), min_size=1, max_size=12, unique_by=tuple),
       st.lists(st.integers(0, 4), min_size=3, max_size=3))
def test_nearest_is_the_first_closest_row(rows: list[list[int]], query: list[int]) -> None:
    from sampler_efficiency import nearest

    x = np.asarray(rows, dtype=float) / 4
    q = np.asarray(query, dtype=float) / 4
    i = nearest(x, q)
    d = ((x - q) ** 2).sum(axis=1)
    assert d[i] == d.min() and i == int(np.flatnonzero(d == d.min())[0])
    for j in range(len(rows)):
        assert nearest(x, x[j]) == j  # rows are unique: a row is its own nearest


def test_encoding_normalises_indices_and_separates_categories() -> None:
    from optuna.distributions import CategoricalDistribution, IntDistribution
    from sampler_efficiency import encode_params

    d = {"a": IntDistribution(0, 4), "b": IntDistribution(0, 1), "c": CategoricalDistribution(["x", "y", "z"])}
    ex = encode_params({"a": 2, "b": 1, "c": "x"}, d)
    ey = encode_params({"a": 2, "b": 1, "c": "z"}, d)
    assert ex[:2].tolist() == [0.5, 1.0]
    assert math.isclose(float(((ex - ey) ** 2).sum()), 1.0)  # two different choices: distance 1


def test_trials_to_target_and_medians() -> None:
    from sampler_efficiency import median_or_none, trials_to_target

    curve = [0.1, 0.3, 0.3, 0.5]
    assert trials_to_target(curve, 0.3) == 2
    assert trials_to_target(curve, 0.1) == 1
    assert trials_to_target(curve, 0.51) is None
    assert median_or_none([2, None, 4]) == 4  # None counts as "more than the budget"
    assert median_or_none([None, None, 3]) is None  # the median seed never got there: reported as such
    assert median_or_none([1, 2, 3, 4]) == 2.5
    assert median_or_none([]) is None


def test_hv_curve_grows_with_hits_and_ignores_failures(table_path: Path) -> None:
    from sampler_efficiency import REF, Table, hv_curve

    table = Table.load(table_path)
    curve = hv_curve(table.points, [3, 1, 1, 2, None, 3, 0])
    assert curve[0] == 0.0  # a failed row adds nothing
    assert curve == sorted(curve)
    assert curve[2] == curve[1]  # a repeat adds nothing
    assert 0 < curve[-1] <= table.table_hv() <= REF ** 3


def test_summary_reads_trials_to_random_target() -> None:
    from sampler_efficiency import summarise

    runs = [{"sampler": "random", "seed": s, "hv": [0.1, 0.2, 0.3, hv]} for s, hv in enumerate([0.4, 0.5, 0.6])]
    runs += [{"sampler": "botorch", "seed": s, "hv": c} for s, c in
             enumerate([[0.1, 0.5, 0.6, 0.7], [0.2, 0.3, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]])]
    summary, curves = summarise(runs, ["botorch", "random"], 4, table_hv=1.0)
    assert summary["random4_hv_median"] == 0.5
    assert summary["botorch_trials_to_random4_hv"] == 3  # seeds reach it at 2, 3 and never
    assert summary["botorch_trials_to_random4_hv_seeds_reached"] == 2
    assert summary["botorch_final_hv_median"] == 0.5 and summary["random_final_hv_median"] == 0.5
    assert curves["botorch"][0].tolist() == [0.1, 0.3, 0.5, 0.5]


def test_random_replay_runs_on_the_table(table_path: Path) -> None:
    from sampler_efficiency import Table, replay

    table = Table.load(table_path)
    run = replay(table, "random", seed=1, trials=12, n_startup=4)
    assert len(run["hits"]) == 12 and len(run["hv"]) == 12
    assert all(0 <= h < 30 for h in run["hits"])
    assert run["hv"] == sorted(run["hv"])
    assert run["failed"] == sum(1 for h in run["hits"] if h == 3)


def test_botorch_budget_overrides_are_checked() -> None:
    """`--botorch NAME=N` changes one of the sampler's budget constants for an experiment; a typo must not run
    a 15-minute replay with the defaults."""
    from sampler_efficiency import botorch_settings

    assert botorch_settings(["MC_SAMPLES=32", "RAW_SAMPLES=128"]) == {"MC_SAMPLES": 32, "RAW_SAMPLES": 128}
    for bad in ("MC_SAMPLE=32", "MC_SAMPLES=0", "MC_SAMPLES=x"):
        with pytest.raises(SystemExit, match="--botorch"):
            botorch_settings([bad])
