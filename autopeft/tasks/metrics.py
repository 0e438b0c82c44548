"""Each task's metric, computed the way GLUE reports it; the task's main metric comes first."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((preds == labels).mean()) if len(labels) else float("nan")


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    tp = float(((preds == 1) & (labels == 1)).sum())
    fp = float(((preds == 1) & (labels != 1)).sum())
    fn = float(((preds != 1) & (labels == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (binary or multi-class, Gorodkin's generalisation); 0 when undefined, as sklearn."""
    classes = np.union1d(preds, labels)
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for p, y in zip(preds, labels, strict=True):
        cm[index[y], index[p]] += 1
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    c, s = np.trace(cm), cm.sum()
    denom = math.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return 0.0 if denom == 0 else float((c * s - (t * p).sum()) / denom)


def _rank(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(len(a), dtype=np.float64)
    for value in np.unique(a):  # ties share their mean rank
        tie = a == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    if len(preds) < 2 or np.std(preds) == 0 or np.std(labels) == 0:
        return 0.0
    return float(np.corrcoef(preds, labels)[0, 1])


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    return pearson(_rank(np.asarray(preds, dtype=np.float64)), _rank(np.asarray(labels, dtype=np.float64)))


FUNCTIONS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}

#: the metrics reported beside each main metric (GLUE's pairs)
COMPANIONS = {"accuracy": (), "f1": ("accuracy",), "matthews": ("accuracy",), "pearson": ("spearman",),
              "spearman": ("pearson",)}


def compute_metrics(task: object, preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """{main metric: value, companions...}; `task` is a TaskData (its `metric_name` picks the main one)."""
    main = task.metric_name  # type: ignore[attr-defined]
    p, y = np.asarray(preds), np.asarray(labels)
    if main in ("pearson", "spearman"):
        p, y = p.astype(np.float64), y.astype(np.float64)
    return {name: FUNCTIONS[name](p, y) for name in (main, *COMPANIONS[main])}
