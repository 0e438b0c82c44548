"""GLUE metrics agree with the standard definitions (checked against scipy/sklearn-style hand values)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from autopeft.tasks import Split, TaskData, compute_metrics, holdout_split


def task(metric: str) -> TaskData:
    empty = Split([], [])
    return TaskData("t", empty, empty, 2, [], metric)


def test_main_metric_first_with_glue_companions() -> None:
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 0, 1]
    assert list(compute_metrics(task("f1"), preds, labels)) == ["f1", "accuracy"]
    assert compute_metrics(task("f1"), preds, labels)["f1"] == pytest.approx(0.8)
    assert compute_metrics(task("accuracy"), preds, labels) == {"accuracy": 0.8}
    # MCC by hand: tp=2 tn=2 fp=1 fn=0 -> (4-0)/sqrt(3*2*3*2) = 4/6
    assert compute_metrics(task("matthews"), preds, labels)["matthews"] == pytest.approx(4 / 6)


def test_correlations() -> None:
    labels = [0.0, 1.0, 2.0, 3.0, 4.0]
    preds = [0.1, 0.9, 2.5, 2.6, 10.0]
    m = compute_metrics(task("pearson"), preds, labels)
    assert m["pearson"] == pytest.approx(np.corrcoef(preds, labels)[0, 1])
    assert m["spearman"] == pytest.approx(1.0)


@given(st.lists(st.integers(0, 2), min_size=4, max_size=200), st.floats(0.05, 0.5), st.integers(0, 10))
def test_holdout_is_a_seeded_stratified_partition(labels: list[int], fraction: float, seed: int) -> None:
    split = Split([str(i) for i in range(len(labels))], labels)
    train, held = holdout_split(split, fraction, seed)
    assert sorted(train.text + held.text, key=int) == split.text  # a partition: nothing lost, nothing twice
    assert len(train) >= 1 and len(held) >= 1
    assert holdout_split(split, fraction, seed) == (train, held)
    for y in set(labels):  # stratified: each class's share is kept to within one example
        n = labels.count(y)
        assert abs(held.label.count(y) - n * fraction) <= 1 or len(held) in (1, len(labels) - 1)
