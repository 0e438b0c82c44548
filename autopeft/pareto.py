"""The Pareto front of a study, non-dominated masks and hypervolume, on Optuna's own algorithms.

Optuna already has a tested non-dominated sort and an exact hypervolume (WFG, with 2-D/3-D fast paths); we
only translate directions ("maximize" accuracy, "minimize" params and memory) into Optuna's all-minimise
loss space. Re-implementing either would be a second copy to get wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from autopeft.sampler import CONSTRAINTS_ATTR


def _signs(directions: Sequence[Any], n: int) -> np.ndarray:
    """+1 for minimise, -1 for maximise: multiplying by it maps values into Optuna's loss space."""
    if len(directions) != n:
        raise ValueError(f"{len(directions)} directions for {n} objectives")
    signs = []
    for d in directions:
        name = d.name if isinstance(d, StudyDirection) else str(d)
        name = name.strip().lower()
        if name not in ("minimize", "maximize"):
            raise ValueError(f"direction {d!r} is neither minimize nor maximize")
        signs.append(1.0 if name == "minimize" else -1.0)
    return np.asarray(signs)


def _as_matrix(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1) if arr.size else arr.reshape(0, 0)
    if arr.ndim != 2:
        raise ValueError(f"expected an (n_points, n_objectives) array, got shape {arr.shape}")
    return arr


def nondominated_mask(values: Any, directions: Sequence[Any]) -> np.ndarray:
    """True for every point no other point dominates. Duplicates of a front point are all on the front,
    since none dominates the other (a person choosing from the front should see both trials)."""
    arr = _as_matrix(values)
    if arr.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    loss = arr * _signs(directions, arr.shape[1])
    from optuna.study._multi_objective import _is_pareto_front

    return np.asarray(_is_pareto_front(loss, assume_unique_lexsorted=False), dtype=bool)


def hypervolume(points: Any, reference: Sequence[float], directions: Sequence[Any]) -> float:
    """The volume the points dominate up to `reference` (given in the objectives' own units and directions).

    Points that do not dominate the reference in every objective add nothing and are dropped, rather than
    rejected as Optuna's routine does: a bad trial should not make a study's hypervolume undefined.
    """
    arr = _as_matrix(points)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"reference point {list(ref)} must be finite")
    signs = _signs(directions, ref.size)
    if arr.shape[0] == 0:
        return 0.0
    if arr.shape[1] != ref.size:
        raise ValueError(f"points have {arr.shape[1]} objectives, the reference {ref.size}")
    loss, ref_loss = arr * signs, ref * signs
    loss = loss[np.all(loss <= ref_loss, axis=1) & np.all(np.isfinite(loss), axis=1)]
    if loss.shape[0] == 0:
        return 0.0
    from optuna._hypervolume import compute_hypervolume

    return float(compute_hypervolume(loss, ref_loss))


def is_feasible(trial: FrozenTrial) -> bool:
    """Feasible by the constraints Optuna recorded *and* those search.py stored as a user attribute.

    Reading both matters because a study may be looked at without the sampler that recorded system
    attributes (or by a sampler that records none), while search.py writes the user attribute always.
    """
    values = list(trial.constraints.values()) + list(trial.user_attrs.get(CONSTRAINTS_ATTR) or [])
    return all(float(c) <= 0.0 for c in values)


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The feasible COMPLETE trials no other feasible trial dominates, in trial order.

    Equal to `study.best_trials` when a constraint-aware sampler ran the study; computed here instead so that
    trials whose constraints live only in the user attribute are filtered too. Infeasible trials are removed
    before the sort, never after, so they cannot hide a feasible trial they happen to dominate.
    """
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)]
    trials = [t for t in trials if t.values is not None and len(t.values) == len(study.directions)]
    if not trials:
        return []
    mask = nondominated_mask([t.values for t in trials], study.directions)
    return [t for t, on in zip(trials, mask) if on]
