"""Pareto utilities: the mask is the non-dominated set, hypervolume is monotone and exact, fronts honour constraints."""

from __future__ import annotations

import itertools

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopeft.pareto import front_trials, hypervolume, is_feasible, nondominated_mask


@st.composite
def cloud(draw: st.DrawFn, n_obj: int | None = None, low: int = 0, high: int = 9) -> np.ndarray:
    k = n_obj or draw(st.integers(2, 3))
    rows = draw(st.lists(st.lists(st.integers(low, high), min_size=k, max_size=k), min_size=0, max_size=25))
    return np.asarray(rows, dtype=float).reshape(len(rows), k)


def dominates(a: np.ndarray, b: np.ndarray, signs: np.ndarray) -> bool:
    la, lb = a * signs, b * signs
    return bool(np.all(la <= lb) and np.any(la < lb))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mask_is_the_nondominated_set(data: st.DataObject) -> None:
    pts = data.draw(cloud())
    dirs = data.draw(st.lists(st.sampled_from(["minimize", "maximize"]), min_size=pts.shape[1],
                              max_size=pts.shape[1]))
    signs = np.array([1.0 if d == "minimize" else -1.0 for d in dirs])
    mask = nondominated_mask(pts, dirs)
    assert mask.shape == (len(pts),)
    for i in range(len(pts)):
        dominated = any(dominates(pts[j], pts[i], signs) for j in range(len(pts)))
        assert mask[i] == (not dominated)
        if not mask[i]:  # every dominated point is dominated by a front point
            assert any(dominates(pts[j], pts[i], signs) for j in np.flatnonzero(mask))


def brute_force_hv_2d(pts: np.ndarray, ref: tuple[int, int]) -> float:
    """Count the unit cells of the integer grid covered by some point's box [p, ref] (minimisation)."""
    covered = 0
    for x, y in itertools.product(range(ref[0]), range(ref[1])):
        covered += any(p[0] <= x and p[1] <= y for p in pts)
    return float(covered)


@settings(max_examples=150, deadline=None)
@given(pts=cloud(n_obj=2, high=12))
def test_hypervolume_matches_brute_force_2d(pts: np.ndarray) -> None:
    ref = (10, 10)
    assert hypervolume(pts, ref, ["minimize", "minimize"]) == pytest.approx(brute_force_hv_2d(pts, ref))
    # the same volume seen through a maximised first objective
    flipped = pts * np.array([-1.0, 1.0])
    assert hypervolume(flipped, (-10, 10), ["maximize", "minimize"]) == pytest.approx(brute_force_hv_2d(pts, ref))


@settings(max_examples=100, deadline=None)
@given(pts=cloud(n_obj=3), extra=cloud(n_obj=3))
def test_hypervolume_is_monotone(pts: np.ndarray, extra: np.ndarray) -> None:
    dirs, ref = ["minimize"] * 3, (10.0, 10.0, 10.0)
    both = np.concatenate([pts, extra]) if len(extra) else pts
    assert hypervolume(both, ref, dirs) >= hypervolume(pts, ref, dirs) - 1e-9
    front = pts[nondominated_mask(pts, dirs)] if len(pts) else pts
    assert hypervolume(front, ref, dirs) == pytest.approx(hypervolume(pts, ref, dirs))


def test_hypervolume_edge_cases() -> None:
    assert hypervolume([], (1.0, 1.0), ["minimize", "minimize"]) == 0.0
    assert hypervolume([[2.0, 0.0]], (1.0, 1.0), ["minimize", "minimize"]) == 0.0  # beyond the reference
    assert hypervolume([[0.9, 3.0]], (0.5, 5.0), ["maximize", "minimize"]) == pytest.approx(0.4 * 2.0)
    with pytest.raises(ValueError):
        hypervolume([[0.0, 0.0]], (1.0, 1.0), ["minimize"])
    with pytest.raises(ValueError):
        nondominated_mask([[0.0, 0.0]], ["minimize", "upward"])


def test_front_trials_respects_constraints_from_user_attrs() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])  # a sampler that records nothing

    def add(values: list[float], constraints: list[float] | None) -> None:
        trial = optuna.trial.create_trial(values=values, params={}, distributions={},
                                          user_attrs={} if constraints is None else {"constraints": constraints})
        study.add_trial(trial)

    add([0.9, 100.0], [5.0])   # best on both, but infeasible: must not hide trial 1
    add([0.8, 200.0], [-1.0])
    add([0.85, 300.0], [0.0])  # on the boundary: feasible
    add([0.7, 250.0], None)    # dominated by trial 1
    front = front_trials(study)
    assert [t.number for t in front] == [1, 2]
    assert not is_feasible(study.trials[0]) and is_feasible(study.trials[3])
