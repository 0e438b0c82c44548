"""Samplers: every name builds, BoTorch runs a constrained multi-objective study end to end, seeds repeat."""

from __future__ import annotations

import logging
import math
import time

import optuna
import pytest
from optuna.trial import TrialState

from autopeft.errors import UserError
from autopeft.pareto import front_trials
from autopeft.sampler import SAMPLERS, make_sampler
from autopeft.search import suggest_all
from autopeft.space import SearchSpace

LAYERS = 4
SPACE = SearchSpace.load("mixed")
DISTS = SPACE.distributions(LAYERS)
LIMIT = 250.0


def fake_objective(n_objectives: int, fail_on: int | None = None):
    """Accuracy saturating in size, size, memory: cheap, deterministic, with a size constraint and a failure."""

    def run(trial: optuna.Trial) -> list[float]:
        params = suggest_all(trial, DISTS)
        spec = SPACE.decode(params, LAYERS)
        size = (sum(sum(r) for r in spec.lora.values()) + sum(spec.serial_adapter) + sum(spec.parallel_adapter)
                + sum(spec.prefix) + 8 * sum(sum(b) for b in spec.ia3.values()) + 16 * sum(spec.bitfit))
        trial.set_user_attr("constraints", [size - LIMIT])
        if trial.number == fail_on:
            raise RuntimeError("simulated OOM")
        values = [0.5 + 0.4 * (1 - math.exp(-size / 60)), math.log10(1 + size), 100 + 0.3 * size]
        return values[:n_objectives]

    return run


DIRECTIONS = ["maximize", "minimize", "minimize"]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("constraints", [False, True])
def test_every_sampler_builds_and_samples(name: str, constraints: bool) -> None:
    sampler = make_sampler(name, seed=0, n_startup_trials=2, constraints=constraints, n_objectives=2)
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    if name != "botorch":  # botorch's proposals are covered below, where they have time to run
        study = optuna.create_study(directions=DIRECTIONS[:2], sampler=sampler)
        study.optimize(fake_objective(2), n_trials=4)
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
        if constraints:
            assert all(t.constraints for t in study.trials)


def test_unknown_sampler() -> None:
    with pytest.raises(UserError, match=r"unknown sampler 'cmaes'.*botorch"):
        make_sampler("cmaes", seed=0, n_startup_trials=2, constraints=False, n_objectives=2)


def test_botorch_end_to_end_constrained_with_a_failed_trial(caplog: pytest.LogCaptureFixture) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    caplog.set_level(logging.WARNING, logger="autopeft.sampler")
    sampler = make_sampler("botorch", seed=0, n_startup_trials=6, constraints=True, n_objectives=3)
    study = optuna.create_study(directions=DIRECTIONS, sampler=sampler)
    started = time.time()
    study.optimize(fake_objective(3, fail_on=3), n_trials=12, catch=(RuntimeError,))
    elapsed = time.time() - started
    trials = study.trials
    assert [t.state for t in trials].count(TrialState.FAIL) == 1
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 11
    for t in trials[7:]:  # proposals of the model (startup counted on COMPLETE + RUNNING trials)
        assert set(t.params) == set(DISTS)
        assert all(DISTS[k]._contains(DISTS[k].to_internal_repr(v)) for k, v in t.params.items())
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(t.constraints == {"0": t.user_attrs["constraints"][0]} for t in done)  # recorded for Optuna
    front = front_trials(study)
    assert front and all(t.user_attrs["constraints"][0] <= 0 for t in front)
    assert {t.number for t in front} == {t.number for t in study.best_trials}
    assert "proposal failed" not in caplog.text  # the model proposed, not the random fallback
    assert elapsed < 90, f"12 trials took {elapsed:.0f}s"


def test_botorch_single_objective(caplog: pytest.LogCaptureFixture) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    caplog.set_level(logging.WARNING, logger="autopeft.sampler")
    sampler = make_sampler("botorch", seed=1, n_startup_trials=4, constraints=True, n_objectives=1)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(fake_objective(1), n_trials=6)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
    assert "proposal failed" not in caplog.text


def test_botorch_falls_back_instead_of_crashing(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from autopeft.sampler import LogNEHVICandidates

    bounds = torch.tensor([[-0.5, -0.5], [4.5, 1.5]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]], dtype=torch.float64)
    bad = torch.full((3, 2), float("nan"), dtype=torch.float64)  # nothing to learn from
    out = LogNEHVICandidates()(x, bad, None, bounds, None)
    assert out.shape == (1, 2) and bool(((out >= bounds[0]) & (out <= bounds[1])).all())
    broken = torch.ones(3, 2, 2, dtype=torch.float64)  # wrong rank: the fit raises, the study must not
    with caplog.at_level(logging.WARNING, logger="autopeft.sampler"):
        out = LogNEHVICandidates()(x, broken, None, bounds, None)
    assert out.shape == (1, 2) and "proposal failed" in caplog.text


@pytest.mark.parametrize("name", ["random", "tpe", "nsga2"])
def test_seeded_reproducible(name: str) -> None:
    def params(seed: int) -> list[dict]:
        study = optuna.create_study(directions=DIRECTIONS, sampler=make_sampler(name, seed, 3, True, 3))
        study.optimize(fake_objective(3), n_trials=8)
        return [t.params for t in study.trials]

    assert params(5) == params(5)
    assert params(5) != params(6)


def test_botorch_proposes_only_new_configurations_with_a_canonical_key() -> None:
    """Many params decode to one configuration (all layer bits off = head only, the cheapest front point);
    the rounded acquisition optimum kept landing there. With the canonical key every proposal is new."""
    import json
    import math
    import random

    from autopeft.space import SearchSpace

    space, layers = SearchSpace.load("mixed"), 4
    dists = space.distributions(layers)

    def key(params: dict) -> str:
        return json.dumps(space.decode(params, layers).to_dict(), sort_keys=True)

    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler("botorch", 0, 5, constraints=False, n_objectives=2,
                                                     canonical=key))
    rng, keys = random.Random(0), []
    for _ in range(10):
        trial = study.ask(dists)
        spec = space.decode(trial.params, layers)
        n = sum(sum(r) for r in spec.lora.values()) + sum(spec.serial_adapter) + sum(spec.prefix)
        keys.append(key(trial.params))
        study.tell(trial, [0.55 + 0.3 * (1 - math.exp(-n / 60)) + rng.gauss(0, 0.01), math.log10(1 + n)])
    assert len(set(keys)) == len(keys)


def test_botorch_q_batch_enqueues_the_rest_of_the_batch_within_the_budget() -> None:
    """One GP fit proposes `batch` new configurations: the asked trial gets the first, the others wait in the
    study (tagged with the trial that proposed them) and the next asks take them without fitting; `room`
    caps what is enqueued, so a study at its budget is left with nothing waiting."""
    import json

    from autopeft.sampler import BATCH_ATTR, LogNEHVICandidates

    def key(params: dict) -> str:
        return json.dumps(SPACE.decode(params, LAYERS).to_dict(), sort_keys=True)

    budget = 9
    room = lambda s: budget - len(s.get_trials(states=(TrialState.COMPLETE, TrialState.RUNNING,
                                                       TrialState.WAITING)))
    sampler = make_sampler("botorch", 0, 5, constraints=False, n_objectives=3, canonical=key, batch=3, room=room)
    fits = []
    cf = sampler._candidates_func
    assert isinstance(cf, LogNEHVICandidates)
    original = cf._fit
    cf._fit = lambda x, y: fits.append(len(x)) or original(x, y)
    study = optuna.create_study(directions=DIRECTIONS, sampler=sampler)
    study.optimize(fake_objective(3), n_trials=5)  # the random start
    assert fits == []
    study.optimize(fake_objective(3), n_trials=1)  # trial 5: one fit, trials 6 and 7 queued
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert fits == [5] and [t.user_attrs[BATCH_ATTR] for t in waiting] == [5, 5]
    study.optimize(fake_objective(3), n_trials=2)  # the queued proposals: no new fit
    assert fits == [5] and not study.get_trials(states=(TrialState.WAITING,))
    study.optimize(fake_objective(3), n_trials=1)  # trial 8 is the last of the budget: nothing to enqueue
    assert fits == [5, 8] and not study.get_trials(states=(TrialState.WAITING,))
    keys = [key(t.params) for t in study.trials]
    assert len(set(keys[5:])) == 4 and not set(keys[5:]) & set(keys[:5])  # the batch spreads over new configs


def test_proposal_batch_must_be_positive() -> None:
    with pytest.raises(UserError, match="proposal batch must be >= 1"):
        make_sampler("botorch", 0, 5, constraints=False, n_objectives=3, batch=0)


def test_botorch_box_decomposition_equals_botorchs() -> None:
    """The NumPy decomposition (`_partitioning_class`) must give BoTorch's FastNondominatedPartitioning cells
    exactly, in the same order: fronts of 3 and 4 objectives, with ties, duplicates, points beyond the reference
    point and an empty front."""
    torch = pytest.importorskip("torch")
    from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning

    from autopeft.sampler import _partitioning_class

    ours = _partitioning_class()
    g = torch.Generator().manual_seed(0)
    for case in range(60):
        m, n = (4 if case % 3 == 0 else 3), case % 16
        y = torch.rand(n, m, generator=g, dtype=torch.double)
        if case % 4 == 0:
            y = (y * 4).round() / 4  # ties
        if case % 5 == 0 and n > 1:
            y[1] = y[0]
        ref = torch.full((m,), 0.2 if case % 2 else -0.1, dtype=torch.double)
        theirs, mine = FastNondominatedPartitioning(ref_point=ref, Y=y), ours(ref_point=ref, Y=y)
        assert torch.equal(mine.get_hypercell_bounds(), theirs.get_hypercell_bounds()), (case, m, n)


def test_botorch_acquisition_equals_botorchs_qlognehvi() -> None:
    """The acquisition the sampler builds (`_log_nehvi_class`) is BoTorch's qLogNEHVI, value for value."""
    torch = pytest.importorskip("torch")
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.models import SingleTaskGP
    from botorch.sampling import SobolQMCNormalSampler

    from autopeft.sampler import _log_nehvi_class, _partitioning_class

    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 4, generator=g, dtype=torch.double)
    y = torch.stack([x.sum(-1), -x[:, 0], (x[:, 1] - 0.5) ** 2], dim=-1)
    model = SingleTaskGP(x, y).eval()
    test = torch.rand(5, 2, 4, generator=g, dtype=torch.double)
    ours, theirs = (cls(model=model, ref_point=[0.0, -1.1, -0.1], X_baseline=x, prune_baseline=False,
                        sampler=SobolQMCNormalSampler(torch.Size([16]), seed=0))
                    for cls in (_log_nehvi_class(), qLogNoisyExpectedHypervolumeImprovement))
    assert all(isinstance(p, _partitioning_class()) for p in ours.partitioning.box_decompositions)
    assert not isinstance(theirs.partitioning.box_decompositions[0], _partitioning_class())
    assert torch.equal(ours(test).detach(), theirs(test).detach())


def test_a_botorch_whose_internals_changed_keeps_its_own_decomposition(monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """If an installed BoTorch release no longer matches the NumPy decomposition (it overrides private API), the
    sampler must not lose its proposals: it keeps BoTorch's own decomposition and says so once."""
    torch = pytest.importorskip("torch")
    from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning

    from autopeft import sampler

    assert sampler.numpy_boxes_match()  # the installed, tested release
    broken = type("Broken", (FastNondominatedPartitioning,), {"_partition_space": lambda self: 1 / 0})
    for f in (sampler.numpy_boxes_match, sampler._log_nehvi_class):
        f.cache_clear()
    monkeypatch.setattr(sampler, "_partitioning_class", lambda: broken)
    try:
        with caplog.at_level("WARNING", logger="autopeft.sampler"):
            assert not sampler.numpy_boxes_match()
            cls = sampler._log_nehvi_class()
        assert "using BoTorch's own" in caplog.text
        from botorch.models import SingleTaskGP

        x = torch.rand(8, 2, dtype=torch.double)
        model = SingleTaskGP(x, torch.stack([x.sum(-1), -x[:, 0], -x[:, 1]], -1)).eval()
        acqf = cls(model=model, ref_point=[0.0, -1.1, -1.1], X_baseline=x, prune_baseline=False)
        assert type(acqf.partitioning.box_decompositions[0]) is FastNondominatedPartitioning
    finally:
        for f in (sampler.numpy_boxes_match, sampler._log_nehvi_class):
            f.cache_clear()
