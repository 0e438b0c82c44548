"""The samplers a study can use, and the BoTorch acquisition behind the default one.

`botorch` is Optuna's `BoTorchSampler` with our own `candidates_func` (the signature of Optuna's
`qnehvi_candidates_func`), because the defaults do not fit a PEFT search:

* Acquisition: qLogNEHVI (qLogNEI for one objective). Log-EI-family acquisitions keep usable gradients where
  plain (q)EHVI is numerically flat (Ament et al., 2023), and the *noisy* variant integrates over the GP's
  belief about the baseline instead of trusting measured accuracies, which jitter by a point or more between
  seeds at search fidelity. Optuna's default for 2-3 objectives is qEHVI, its default for constraints qEI.
* Model: one `SingleTaskGP` over objectives and constraints, with BoTorch's default dimension-scaled
  lengthscale prior (Hvarfner et al., 2024), which stays sample-efficient at the ~20-40 dimensions of our
  spaces. A SAAS GP would also suit that regime but is fitted by NUTS: tens of seconds to minutes per proposal
  on two CPU cores, more than a short trial costs.
* Optimiser budget: 2 restarts from 128 raw samples, 64 MC samples, at most 100 L-BFGS iterations, and a
  warm-started GP fit capped at 75. The space is integer indices relaxed to intervals and rounded
  afterwards, so a finely converged continuous optimum buys little: the discrete selection (256 Sobol points
  and the rounded optimum's neighbours, see `discrete`) does the rest. qLogNEHVI's cost grows with its
  baseline (one box decomposition of the baseline's front per MC sample), so the baseline is pruned to the 16
  trials most likely Pareto-optimal, and the decompositions are BoTorch's exact algorithm run in NumPy
  (`_partitioning_class`: the same cells, several times faster than BoTorch's per-op PyTorch loop, which was
  2.1 of the 4.9 s a proposal took at 100 trials; now 0.4 of 3.0 s profiled, bench/profile/proposal.py, next
  to optimize_acqf 1.1, the GP fit 0.8 and the discrete selection 0.55). Why each number: the comments at
  the constants below. Measured on an idle 2-core machine, 20 dims, 2026-11-30 (bench/search_overhead.py,
  median of 5 fits): one fit proposing one configuration 2.6 and 2.4 s at 100 trials in two runs
  (search_overhead_v2- and search_overhead_v2_rerun-cpu-2026-11-30.json, and 2.5 s in search_overhead-cpu-
  2026-11-30.json beside a fresh clone's `make search`; 4.9 and 5.0 s with BoTorch's decomposition,
  search_overhead_botorch_boxes{,_rerun}-cpu-2026-11-30.json), 5.3-6.5 s for a q-batch
  of 6, i.e. 0.9-1.1 s per trial (was 8.9 s, 1.4 s per trial). The decomposition and the batched
  raw-sample scoring change no proposal: the 10-seed replay (bench/sampler_efficiency.py) hit the same table
  rows in every run as before, 29 trials to random search's 60-trial hypervolume with 10 of 10 seeds
  (sampler_efficiency_v2-cpu-2026-11-30.json, equal to sampler_efficiency-cpu-2026-11-30.json).
* Reference point: BoTorch's `infer_reference_point` (10% beyond the nadir of the feasible front) rather
  than Optuna's "worst observed", so early fronts do not give zero volume to improvements along one axis.
* Robustness: a sampler that raises stops `study.optimize` for every worker, whereas DESIGN.md wants a study
  that never crashes. Any failure to fit or optimise (too few feasible points, a singular kernel matrix) is
  logged and answered with a uniform random candidate instead.

Constraints: `search.py` stores each trial's constraint values (<= 0 feasible) as the user attribute
`constraints`; every sampler that takes a `constraints_func` gets one reading it. Optuna 5 deprecates
`constraints_func` in favour of `Trial.set_constraint`, but the function keeps search.py's one attribute the
single source, and its FutureWarning is silenced here. Optuna then stores the values in system attributes
(`FrozenTrial.constraints`), which is what its front (`study.best_trials`) and BoTorch read.
FAILED trials never reach the sampler's model: Optuna passes only COMPLETE (and RUNNING) trials.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from optuna.samplers import BaseSampler, NSGAIISampler, RandomSampler, TPESampler
from optuna.trial import FrozenTrial

from autopeft.errors import UserError

if TYPE_CHECKING:
    import torch

SAMPLERS: tuple[str, ...] = ("botorch", "tpe", "nsga2", "random")
CONSTRAINTS_ATTR = "constraints"

#: Acquisition optimiser budget. Judged on the replay benchmark (bench/sampler_efficiency.py, 10 seeds; target:
#: random search's 60-trial hypervolume in <= 30 trials, median) and on proposal time (bench/search_overhead.py,
#: target < 5 s at 100 trials on 2 cores; 2.4-2.6 s with this budget, search_overhead_v2{,_rerun}-cpu-2026-11-30).
#: 4 restarts from 256 raw samples with a 24-point baseline: 30.5 trials, 9 of 10 seeds, 5.6 s
#: (sampler_efficiency_raw_samples256_num_restarts4_max_baseline24-, search_overhead_old_budget-cpu-2026-11-30.json);
#: this budget: 29 trials, 10 of 10 (sampler_efficiency-cpu-2026-11-30.json, and _v2 with the NumPy decomposition).
NUM_RESTARTS = 2  # L-BFGS starts: the discrete selection, not a converged relaxed optimum, picks the point
RAW_SAMPLES = 128  # Sobol points scored (in one batch) to pick the starts; 256 (above) bought no replay trials
MC_SAMPLES = 64  # 32 was worse on the replay: 40.5 trials, 6 of 10 seeds (sampler_efficiency_mc_samples32_...)
MAX_ITER = 100  # L-BFGS iterations per start, a cap
FIT_MAXITER = 75  # GP fit iterations; warm-started from the last proposal's fit, so it converges in fewer
MAX_BASELINE = 16  # baseline points kept for qLogNEHVI (see _propose): its decompositions' cost grows with them
GREEDY_POOL = 32  # candidates the 2nd..qth point of a q-batch is chosen among (see discrete)
DISCRETE_POOL = 256  # Sobol points of the discrete selection, beside the rounded optimum's neighbours

_log = logging.getLogger(__name__)


def constraints_from_user_attr(trial: FrozenTrial) -> Sequence[float]:
    """A trial's constraints as search.py records them: a list of floats, <= 0 feasible."""
    return [float(c) for c in trial.user_attrs.get(CONSTRAINTS_ATTR, [])]


def make_sampler(name: str, seed: int, n_startup_trials: int, constraints: bool, n_objectives: int,
                 canonical: Callable[[dict[str, Any]], str] | None = None, batch: int = 1,
                 room: Callable[[optuna.Study], int] | None = None) -> BaseSampler:
    """A fresh sampler for one study (Optuna's BoTorch sampler keeps per-study state, so never share one).

    `canonical` maps a trial's params to a key equal for params that decode to the same configuration; with
    it, BoTorch proposals are chosen among valid discrete points whose configuration is new (see
    `LogNEHVICandidates.discrete`).

    `batch` > 1 makes each BoTorch proposal a q-batch: one GP fit and one acquisition optimisation choose
    `batch` configurations jointly (sequential-greedy qLogNEHVI over discrete points); the first is the asked
    trial's, the others are enqueued on the study, so the next asks, in this process or any worker's, take them
    without fitting again. That divides the proposal cost per trial by `batch` (the AutoPEFT paper proposes 4 at
    a time), and it is how a packing worker gets K proposals for one pack. `room(study)` caps the extra
    proposals at what the study's budget still has room for, so a finished study leaves none waiting.
    """
    if batch < 1:
        raise UserError(f"proposal batch must be >= 1, got {batch}")
    key = str(name).strip().lower()
    if key not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    if n_objectives < 1:
        raise UserError(f"a study needs at least one objective, got {n_objectives}")
    if n_startup_trials < 0:
        raise UserError(f"n_startup_trials must be >= 0, got {n_startup_trials}")
    cf = constraints_from_user_attr if constraints else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # constraints_func: deprecated in Optuna 5, see above
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if key == "botorch":
            return _botorch_sampler(candidates_func=LogNEHVICandidates(canonical, batch=batch), room=room,
                                    constraints_func=cf,
                                  n_startup_trials=n_startup_trials, seed=seed,
                                  # pending trials of other workers enter as X_pending: no duplicate proposals
                                  consider_running_trials=True,
                                  independent_sampler=RandomSampler(seed=seed))
        if key == "tpe":
            # multivariate: our settings interact (a rank matters only in an inserted layer)
            return TPESampler(seed=seed, n_startup_trials=n_startup_trials, multivariate=True, constraints_func=cf)
        if key == "nsga2":
            # Budgets here are tens of trials: Optuna's default generation of 50 would mean a random search.
            return NSGAIISampler(seed=seed, population_size=max(8, n_startup_trials), constraints_func=cf)
        return ConstrainedRandomSampler(seed=seed, constraints_func=cf)


class ConstrainedRandomSampler(RandomSampler):
    """Random search that still records constraints, so fronts and dashboards treat every sampler alike."""

    def __init__(self, seed: int | None = None,
                 constraints_func: Callable[[FrozenTrial], Sequence[float]] | None = None) -> None:
        super().__init__(seed=seed)
        self._constraints_func = constraints_func

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: Any, values: Sequence[float] | None
                    ) -> None:
        if self._constraints_func is not None:
            from optuna.samplers._base import _process_constraints_after_trial

            _process_constraints_after_trial(self._constraints_func, study, trial, state)
        super().after_trial(study, trial, state, values)


# ----- BoTorch -----------------------------------------------------------------------------------------------
#: user attribute of a trial whose configuration was proposed in another trial's q-batch (that trial's number)
BATCH_ATTR = "autopeft.batch_of"


def _botorch_sampler(room: Callable[[optuna.Study], int] | None = None, **kwargs: Any) -> BaseSampler:
    """Optuna's BoTorchSampler, telling our candidates function the search space of each proposal (it needs
    Optuna's own transform to round and compare candidates; the function itself only sees tensors), and
    enqueuing the rest of a q-batch. Defined on first use: importing BoTorch costs seconds that the other
    samplers should not pay."""
    from optuna_integration import BoTorchSampler

    _load_fused_kernel()

    class _Sampler(BoTorchSampler):
        def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]
                            ) -> dict[str, Any]:
            cf = self._candidates_func
            if not isinstance(cf, LogNEHVICandidates):
                return super().sample_relative(study, trial, search_space)
            cf.search_space, cf.extra = search_space, []
            params = super().sample_relative(study, trial, search_space)
            extra = cf.extra[:max(0, room(study))] if room is not None else cf.extra
            for p in extra:  # WAITING trials: the next asks (any worker's) take them before sampling again
                study.enqueue_trial(p, user_attrs={BATCH_ATTR: trial.number})
            cf.extra = []
            return params

    return _Sampler(**kwargs)


def _load_fused_kernel() -> None:
    """BoTorch (>= 0.18) compiles a fused C++ kernel for qLogNEHVI the first time the acquisition is built, once
    per machine (cached under ~/.cache/torch_extensions): measured 20-45 s on 2 cores, paid inside whichever
    trial's proposal came first. Here it is paid when the study starts, and not again per worker or trial.
    Private BoTorch API: where it is missing, BoTorch loads or skips the kernel by itself."""
    try:
        from botorch.acquisition.multi_objective import logei

        logei._try_load_fused_kernel()
    except Exception:  # an older/newer BoTorch, no compiler: the pure-PyTorch path is used, correctly
        pass


class LogNEHVICandidates:
    """A `candidates_func` for `BoTorchSampler`: one candidate (shape [1, d], in the original bounds) that
    maximises qLogNEHVI, or qLogNEI for one objective. Objectives arrive maximised (Optuna negates minimised
    ones); constraints are <= 0 feasible.

    It is an object, not a function, to warm-start the GP: each proposal starts the hyperparameter fit from
    the previous proposal's optimum, which sees one trial less, so the fit converges in fewer iterations than
    a cold start (the fit is about a quarter of a proposal: 0.8 of 3.0 s profiled at 100 trials). Proposals
    run on one thread (torch's and the BLAS under scipy's L-BFGS-B): the matrices are at most a few hundred
    wide, where more threads only add synchronisation, and on a CPU shared with training they oversubscribe
    it. Measured on 2 loaded cores:
    ~3 s per proposal on one thread against 8-30 s with the default two.
    """

    def __init__(self, canonical: Callable[[dict[str, Any]], str] | None = None, batch: int = 1) -> None:
        self._warm: dict[str, Any] | None = None
        self.canonical = canonical
        self.batch = batch
        self.search_space: dict[str, Any] | None = None  # set by _botorch_sampler's class before each proposal
        self.extra: list[dict[str, Any]] = []  # the rest of the last q-batch, as params (see make_sampler)

    def __call__(self, train_x: torch.Tensor, train_obj: torch.Tensor, train_con: torch.Tensor | None,
                 bounds: torch.Tensor, pending_x: torch.Tensor | None) -> torch.Tensor:
        import torch
        from threadpoolctl import threadpool_limits  # a BoTorch dependency

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with threadpool_limits(limits=1):  # OpenBLAS under scipy's L-BFGS-B, OpenMP under torch
                return self._propose(train_x, train_obj, train_con, bounds, pending_x)
        except Exception as exc:  # a sampler error would stop the whole study (module docstring)
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            _log.warning("BoTorch proposal failed (%s: %s); proposing a random configuration instead",
                         type(exc).__name__, first)
            return random_candidate(bounds)
        finally:
            torch.set_num_threads(threads)

    def _propose(self, train_x: torch.Tensor, train_obj: torch.Tensor, train_con: torch.Tensor | None,
                 bounds: torch.Tensor, pending_x: torch.Tensor | None) -> torch.Tensor:
        import torch
        from botorch.acquisition.logei import qLogNoisyExpectedImprovement
        from botorch.acquisition.multi_objective.objective import IdentityMCMultiOutputObjective
        from botorch.acquisition.multi_objective.utils import prune_inferior_points_multi_objective
        from botorch.acquisition.objective import GenericMCObjective
        from botorch.optim import optimize_acqf
        from botorch.sampling import SobolQMCNormalSampler
        from botorch.utils.multi_objective.hypervolume import infer_reference_point
        from botorch.utils.multi_objective.pareto import is_non_dominated
        from botorch.utils.transforms import normalize, unnormalize

        n_obj = train_obj.shape[-1]
        train_y = train_obj if train_con is None else torch.cat([train_obj, train_con], dim=-1)
        keep = torch.isfinite(train_y).all(dim=-1)
        x, y = normalize(train_x[keep], bounds=bounds), train_y[keep]
        if x.shape[0] < 2:
            return random_candidate(bounds)
        if pending_x is not None:
            pending_x = normalize(pending_x, bounds=bounds) if pending_x.shape[0] else None

        model = self._fit(x, y)
        sampler = SobolQMCNormalSampler(torch.Size([MC_SAMPLES]))
        kwargs: dict[str, Any] = {}
        if train_con is not None:
            kwargs["constraints"] = [_outcome(n_obj + i) for i in range(train_con.shape[-1])]
        if n_obj == 1:
            if train_con is not None:
                kwargs["objective"] = GenericMCObjective(lambda Z, X=None: Z[..., 0])
            acqf = qLogNoisyExpectedImprovement(model=model, X_baseline=x, sampler=sampler, X_pending=pending_x,
                                                prune_baseline=True, **kwargs)
        else:
            obj = y[:, :n_obj]
            feasible = (y[:, n_obj:] <= 0).all(dim=-1) if train_con is not None else torch.ones_like(keep[keep])
            pool = obj[feasible] if feasible.any() else obj
            ref_point = infer_reference_point(pool[is_non_dominated(pool)])
            if train_con is not None:
                kwargs["objective"] = IdentityMCMultiOutputObjective(outcomes=list(range(n_obj)))
            # The acquisition partitions the space once per MC sample around the baseline's front, the cost that
            # grows with the study; keep only the baseline points most likely to be Pareto-optimal.
            baseline = prune_inferior_points_multi_objective(
                model=model, X=x, ref_point=ref_point, objective=kwargs.get("objective"),
                constraints=kwargs.get("constraints"), num_samples=512,
                max_frac=min(1.0, MAX_BASELINE / x.shape[0]))
            acqf = _log_nehvi_class()(
                model=model, ref_point=ref_point.tolist(), X_baseline=baseline, sampler=sampler,
                X_pending=pending_x, prune_baseline=False, alpha=10 ** (-8 + n_obj) if n_obj > 4 else 0.0, **kwargs)
        unit = torch.stack([torch.zeros_like(bounds[0]), torch.ones_like(bounds[1])])
        candidate, _ = optimize_acqf(acq_function=acqf, bounds=unit, q=1, num_restarts=NUM_RESTARTS,
                                     raw_samples=RAW_SAMPLES,
                                     # init_batch_limit: the raw samples scored in one call, not NUM_RESTARTS
                                     # at a time (BoTorch's default: 64 calls, ~0.25 s more at 100 trials)
                                     options={"batch_limit": NUM_RESTARTS, "init_batch_limit": RAW_SAMPLES,
                                              "maxiter": MAX_ITER})
        best = unnormalize(candidate.detach(), bounds=bounds)
        if self.canonical is not None and self.search_space is not None:
            try:
                return self.discrete(acqf, best, train_x, pending_x, bounds)
            except Exception as exc:  # never worse than the continuous optimum
                _log.warning("discrete candidate selection failed (%s); using the rounded optimum", exc)
        return best

    def discrete(self, acqf: Any, best: torch.Tensor, train_x: torch.Tensor, pending_x: torch.Tensor | None,
                 bounds: torch.Tensor) -> torch.Tensor:
        """The valid discrete point of highest acquisition whose configuration no trial has had.

        The acquisition is maximised over a continuous relaxation and Optuna then rounds. In our spaces large
        regions decode to one configuration (every layer bit off is head-only, whatever the sizes), and the
        relaxed optimum keeps rounding onto such a region: measured on the default study, 9 of 12 BoTorch
        proposals were the head-only configuration again. So the candidates are rounded first (Optuna's own
        transform), their configurations compared, and the acquisition evaluated on the new ones only: the
        rounded optimum, its one-step neighbours and a Sobol sample of the space. With `batch` > 1 the next
        points are chosen greedily among the same candidates by their joint q-batch value with those already
        chosen (so a batch spreads out instead of clustering on one optimum), and left in `self.extra`.
        """
        import torch
        from botorch.utils.transforms import normalize, unnormalize
        from optuna._transform import _SearchSpaceTransform
        from torch.quasirandom import SobolEngine

        trans = _SearchSpaceTransform(self.search_space)
        if trans.bounds.shape[0] != bounds.shape[-1]:
            return best
        seen = {self.canonical(trans.untransform(row.numpy())) for row in train_x.detach().cpu()}
        if pending_x is not None:
            # pending_x arrives normalised (see _propose), train_x in the original bounds
            seen |= {self.canonical(trans.untransform(row.numpy()))
                     for row in unnormalize(pending_x, bounds=bounds).detach().cpu()}
        lo, hi = bounds[0], bounds[1]
        around = [best[0]]
        for j in range(best.shape[-1]):  # one step either way in each dimension
            for step in (-1.0, 1.0):
                x = best[0].clone()
                x[j] = (x[j] + step).clamp(lo[j], hi[j])
                around.append(x)
        sobol = SobolEngine(best.shape[-1], scramble=True, seed=len(train_x)).draw(DISCRETE_POOL).to(best)
        pool = torch.cat([torch.stack(around), lo + (hi - lo) * sobol])
        keys, rows = set(), []
        for x in pool:
            params = trans.untransform(x.detach().cpu().numpy())
            key = self.canonical(params)
            if key in seen or key in keys:
                continue
            keys.add(key)
            rows.append(torch.as_tensor(trans.transform(params), dtype=best.dtype))
        if not rows:
            return best
        cand = normalize(torch.stack(rows), bounds=bounds)
        with torch.no_grad():
            single = torch.cat([acqf(chunk.unsqueeze(1)) for chunk in cand.split(128)])
            chosen = [int(single.argmax())]
            # sequential greedy: each next point maximises the joint value with those chosen, among the
            # GREEDY_POOL best single points (a joint q-batch evaluation costs q times a single one, and a point
            # of low value alone rarely completes a batch well)
            top = single.topk(min(GREEDY_POOL, len(rows))).indices
            for _ in range(min(self.batch, len(rows)) - 1):
                fixed = cand[chosen].unsqueeze(0)
                values = acqf(torch.cat([fixed.expand(len(top), -1, -1), cand[top].unsqueeze(1)], dim=1))
                values[torch.isin(top, torch.tensor(chosen))] = -torch.inf
                chosen.append(int(top[int(values.argmax())]))
        picked = [rows[i] for i in chosen]
        self.extra = [trans.untransform(row.numpy()) for row in picked[1:]]
        return picked[0].unsqueeze(0)

    def _fit(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.transforms.outcome import Standardize
        from gpytorch.mlls import ExactMarginalLogLikelihood

        model = SingleTaskGP(x, y, outcome_transform=Standardize(m=y.shape[-1]))
        if self._warm is not None:
            try:
                model.load_state_dict(self._warm, strict=False)
            except RuntimeError:  # another shape (a constraint appeared): start cold
                pass
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model),
                         optimizer_kwargs={"options": {"maxiter": FIT_MAXITER}})
        # Standardize's buffers describe this data set only; everything else is a hyperparameter or a prior.
        self._warm = {k: v.detach().clone() for k, v in model.state_dict().items()
                      if not k.startswith("outcome_transform")}
        return model


@functools.cache
def _log_nehvi_class() -> type:
    """BoTorch's qLogNEHVI, its exact box decompositions computed by `_partitioning_class` (same cells, same
    acquisition values, several times faster: see there)."""
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning

    partitioning = _partitioning_class() if numpy_boxes_match() else None

    class LogNEHVI(qLogNoisyExpectedHypervolumeImprovement):
        def _set_cell_bounds(self, num_new_points: int) -> None:
            # alpha 0 only (an approximate decomposition, alpha > 0, is kept); getattr: a release without the
            # attribute just keeps its own
            if partitioning is not None and getattr(self, "p_class", None) is FastNondominatedPartitioning:
                self.p_class = partitioning
            super()._set_cell_bounds(num_new_points)

    return LogNEHVI


@functools.cache
def numpy_boxes_match() -> bool:
    """Whether the installed BoTorch's decomposition and ours agree exactly on a small seeded front (checked once
    per process, in milliseconds). Why: ours overrides private BoTorch internals (tested against 0.18.1, while
    pyproject allows >= 0.14); if a release changed them, every proposal would fail and fall back to a random
    one. Instead the sampler then keeps BoTorch's own decomposition, slower (about 2 s more per proposal at 100
    trials) with the same result, and says so once."""
    import torch
    from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning

    try:
        g = torch.Generator().manual_seed(0)
        y = torch.rand(12, 3, generator=g, dtype=torch.double)
        ref = torch.full((3,), 0.1, dtype=torch.double)
        ok = torch.equal(_partitioning_class()(ref_point=ref, Y=y).get_hypercell_bounds(),
                         FastNondominatedPartitioning(ref_point=ref, Y=y).get_hypercell_bounds())
    except Exception:  # an internal it reads is gone or changed: not ours to fix at run time
        ok = False
    if not ok:
        import botorch

        _log.warning("BoTorch %s: the fast box decomposition does not match this version's; using BoTorch's own "
                     "(slower proposals, same result)", botorch.__version__)
    return ok


@functools.cache
def _partitioning_class() -> type:
    """BoTorch's `FastNondominatedPartitioning` (the exact decomposition of the space the front does not dominate,
    Lacour et al., 2017, and Yang et al., 2019) with its unbatched algorithm run on NumPy arrays by
    `_local_upper_bounds`: the same steps in the same order, so the same cells in the same order (equal tensors:
    tests/test_sampler.py checks it on random, tied and duplicated fronts of 3 and 4 objectives).

    Why: qLogNEHVI builds one decomposition per MC sample of the baseline's front, each a Python loop of
    PyTorch ops on tensors of a few rows, where every op's fixed cost dominates. It was the largest part of a
    proposal (2.1 of 4.9 s at 100 trials on 2 cores, bench/profile/proposal.py); in NumPy it takes ~0.3-0.4 s.
    It computes in float64 (the sampler's dtype) and overrides private BoTorch API (`_partition_space` here,
    `p_class`/`_set_cell_bounds` in `_log_nehvi_class`): tests/test_sampler.py fails if a release changes it."""
    import numpy as np
    import torch
    from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning

    class Partitioning(FastNondominatedPartitioning):
        def _partition_space(self) -> None:
            if len(self.batch_shape) > 0:  # not reached from qLogNEHVI (one decomposition per sample)
                return super()._partition_space()
            tk = {"dtype": self.Y.dtype, "device": self.Y.device}
            m = self.num_outcomes
            diag = np.arange(m)
            # the minimisation problem's local upper bounds, from the reference point (BoxDecomposition)
            neg_ref = self._neg_ref_point.detach().cpu().numpy().astype(np.float64)
            z = np.full((1, m, m), -np.inf)
            z[0, diag, diag] = neg_ref
            u, z = _local_upper_bounds(self._neg_pareto_Y.detach().cpu().numpy().astype(np.float64),
                                       neg_ref.reshape(1, m).copy(), z)
            self.register_buffer("_U", torch.as_tensor(u, **tk))
            self._Z = torch.as_tensor(z, **tk)
            # _get_partitioning: -U as the front of a minimisation with reference +inf, then get_partition_bounds
            z2 = np.broadcast_to(self.ref_point.detach().cpu().numpy().astype(np.float64), (1, m, m)).copy()
            z2[0, diag, diag] = np.inf
            u2, z2 = _local_upper_bounds(-u, np.full((1, m), np.inf), z2)
            self._U2, self._Z2 = torch.as_tensor(u2, **tk), torch.as_tensor(z2, **tk)
            bounds = np.empty((2, u2.shape[0], m))
            bounds[0, :, 0] = z2[:, 0, 0]
            bounds[1, :, 0] = np.inf
            for j in range(1, m):
                bounds[0, :, j] = z2[:, :j, j].max(axis=1)
                bounds[1, :, j] = u2[:, j]
            empty = (bounds[1] <= bounds[0]).any(axis=-1)
            self.hypercell_bounds = torch.as_tensor(bounds[:, ~empty], **tk)

    return Partitioning


def _local_upper_bounds(front: Any, u: Any, z: Any) -> tuple[Any, Any]:
    """BoTorch's `update_local_upper_bounds_incremental` (Lacour et al., 2017, Alg. 1; minimisation) on NumPy
    arrays: `front` n x m new points, `u` k x m local upper bounds, `z` k x m x m their defining points."""
    import numpy as np

    m = u.shape[-1]
    for p in front:
        hit = (u > p).all(axis=-1)
        if not hit.any():
            continue
        a, a_z = u[hit], z[hit]
        new_u, new_z = [], []
        for j in range(m):
            mask = np.arange(m) != j
            add = p[j] >= a_z[:, mask, j].max(axis=-1)
            if add.any():
                u_j = a[add].copy()
                u_j[:, j] = p[j]
                new_u.append(u_j)
                z_j = np.empty((u_j.shape[0], m, m))
                z_j[:, mask] = a_z[add][:, mask]
                z_j[:, j] = p
                new_z.append(z_j)
        u, z = u[~hit], z[~hit]
        if new_u:
            u, z = np.concatenate([u, *new_u]), np.concatenate([z, *new_z])
    return u, z


def random_candidate(bounds: torch.Tensor) -> torch.Tensor:
    """Uniform in the bounds; seeded by the `manual_seed` the BoTorch sampler wraps every proposal in."""
    import torch

    u = torch.rand(1, bounds.shape[-1], dtype=bounds.dtype, device=bounds.device)
    return bounds[0] + u * (bounds[1] - bounds[0])


def _outcome(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def constraint(z: torch.Tensor) -> torch.Tensor:
        return z[..., i]

    return constraint
