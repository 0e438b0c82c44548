"""The study: an Optuna study on an RDB storage, a multi-objective sampler, and one trial per proposal.

Optuna's storage is the engine (SQLite on one machine, PostgreSQL for many): trials, heartbeats, retries
of trials whose worker died, and the budget are all kept there, never in this process. Every trial is
scored on a held-out part of the training data (honest selection) and its dev metric is logged beside.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autopeft.cuda_graphs import use_cuda_graphs
from autopeft.errors import TrialFailed, UserError
from autopeft.models import load_backbone, resolve_backbone
from autopeft.pack_size import AUTO, PackPlanner, most_trials, packs, parse_pack_size
from autopeft.peft import ModelDims, head_param_count, peft_param_count
from autopeft.spec import Fidelity, Metrics, PeftSpec
from autopeft.train import DataOptions, TrialConfig, pick_device, run_trial
from autopeft.worker import FAIL_REASON, SHADOW_ATTR
from autopeft.yamlio import load_yaml

REPO = Path(__file__).resolve().parents[1]
STUDIES_DIR = REPO / "studies"
OBJECTIVES = {"metric": "maximize", "params": "minimize", "memory": "minimize"}


@dataclass(frozen=True)
class SearchOptions:
    """Everything `autopeft search` needs; defaults come from the task's preset in `studies/`."""

    task: str
    study: str | None = None
    out: str = "autopeft-runs"
    storage: str | None = None
    tracking_uri: str | None = None  # None: the embedded MLflow store sqlite:///OUT/mlflow.db
    experiment: str | None = None  # None: autopeft/TASK
    tracking: bool = True
    space: str = "mixed"
    backbone: str = "minilm"
    data: DataOptions = field(default_factory=DataOptions)
    n_trials: int = 12
    timeout: float | None = None
    sampler: str = "botorch"
    n_startup_trials: int = 6
    seed: int = 0
    max_params: str | None = None
    max_memory: float | None = None
    objectives: tuple[str, ...] = ("metric", "params", "memory")
    heldout_examples: int = 1000
    fidelity: Fidelity = field(default_factory=Fidelity)
    resume: bool = False
    device: str | None = None
    progress: bool = True
    workers: int | None = None  # None/1: trials run in this process; N > 1: N `autopeft worker` processes
    proposal_batch: int = 1  # BoTorch configurations proposed per GP fit (see autopeft.sampler.make_sampler)
    #: trials trained together on one shared backbone (autopeft.packing); 1 = one at a time; "auto": as many as the
    #: device's memory holds (autopeft.pack_size)
    pack_size: int | str = 1

    @property
    def study_name(self) -> str:
        return self.study or self.task.replace("/", "-")


# ----- presets ---------------------------------------------------------------------------------------------
def preset_path(task: str) -> Path:
    return STUDIES_DIR / f"{task.replace('/', '-')}.yaml"


def load_preset(task: str, *, gpu: bool) -> dict[str, Any]:
    """The task's preset (or `studies/default.yaml`), with the GPU fidelity chosen when a GPU is there."""
    path = preset_path(task)
    if not path.is_file():
        path = STUDIES_DIR / "default.yaml"
    preset = dict(load_yaml(path, "study preset") or {})
    gpu_fid = preset.pop("gpu_fidelity", None)
    if gpu and gpu_fid:
        preset["fidelity"] = gpu_fid
    gpu_pack = preset.pop("gpu_pack_size", None)
    if gpu and gpu_pack:
        preset["pack_size"] = gpu_pack
    preset.pop("task", None)
    return preset


def options_from_preset(task: str, overrides: Mapping[str, Any], *, gpu: bool) -> SearchOptions:
    """Preset fields, then every flag the user actually gave (a flag always wins over the preset)."""
    preset = load_preset(task, gpu=gpu)
    known = {f.name for f in dataclasses.fields(SearchOptions)}
    unknown = sorted(set(preset) - known)
    if unknown:
        raise UserError(f"study preset for {task}: unknown key(s) {', '.join(unknown)}")
    merged = {**preset, **{k: v for k, v in overrides.items() if v is not None}}
    fid = merged.get("fidelity")
    if not isinstance(fid, Fidelity):
        merged["fidelity"] = Fidelity.from_dict(fid)
    if "objectives" in merged:
        objectives = tuple(merged["objectives"])
        bad = [o for o in objectives if o not in OBJECTIVES]
        if bad or "metric" not in objectives:
            raise UserError(f"unknown objective(s) {bad or objectives}; use 'metric' plus any of params, memory")
        merged["objectives"] = objectives
    if "pack_size" in merged:
        merged["pack_size"] = parse_pack_size(merged["pack_size"])
    return SearchOptions(task=task, **{k: v for k, v in merged.items() if k != "task"})


# ----- storage ----------------------------------------------------------------------------------------------
def storage_url(opts: SearchOptions) -> str:
    if opts.storage:
        return opts.storage
    return f"sqlite:///{(Path(opts.out) / 'optuna.db').resolve()}"


def mask_url(url: str) -> str:
    """Hide a password in a storage/tracking URL before it is printed or stored anywhere."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_storage(url: str, *, heartbeat: bool = True) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats, so a trial whose process died is failed and retried (twice at most)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if heartbeat:
        from autopeft.worker import RetryCallback, heartbeat_settings

        interval, grace = heartbeat_settings()
        # a stale trial is failed with reason `heartbeat` (kept on the study) and re-queued twice at most
        kwargs = {"heartbeat_interval": interval, "grace_period": grace,
                  "heartbeat_stale_trial_callback": RetryCallback(max_retry=2, reason="heartbeat")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **kwargs)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        detail = mask_secret(detail, url)
        raise UserError(f"cannot open storage {mask_url(url)}: {detail}; check the URL, server and password") from None


def mask_secret(text: str, url: str) -> str:
    """`text` with the URL's password (and the unmasked URL itself) replaced, for errors and logs."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:
        from urllib.parse import urlsplit

        password = urlsplit(url).password if "://" in url else None
    text = text.replace(url, mask_url(url))
    return text.replace(str(password), "***") if password else text


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {}


# ----- the parts of a study -----------------------------------------------------------------------------------
def parse_max_params(value: str | int | float | None, backbone_params: int) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            return int(backbone_params * pct / 100)
        n = float(text)
        if n <= 0:
            raise ValueError
        return int(n)
    except ValueError:
        raise UserError(f"--max-params {value!r}: give a positive count (e.g. 50000) or a percentage "
                        "(e.g. 0.5%)") from None


def space_fingerprint(distributions: Mapping[str, Any]) -> str:
    text = json.dumps({k: optuna.distributions.distribution_to_json(v) for k, v in distributions.items()},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def suggest_all(trial: optuna.Trial, distributions: Mapping[str, Any]) -> dict[str, Any]:
    """Ask for every parameter of the fixed space (none is conditional: BoTorch needs a fixed space)."""
    out = {}
    for name, d in distributions.items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            out[name] = trial.suggest_categorical(name, d.choices)
        elif isinstance(d, optuna.distributions.IntDistribution):
            out[name] = trial.suggest_int(name, d.low, d.high, step=d.step, log=d.log)
        else:
            out[name] = trial.suggest_float(name, d.low, d.high, step=d.step, log=d.log)
    return out


def objective_values(m: Metrics, objectives: tuple[str, ...]) -> list[float]:
    table = {"metric": m.metric, "params": math.log10(max(1, m.trainable_params)), "memory": m.peak_memory_mb}
    return [table[o] for o in objectives]


@dataclass
class Study:
    """A prepared study: validated inputs, the Optuna study, and how to turn its params into a trial."""

    opts: SearchOptions
    study: optuna.Study
    space: Any
    distributions: dict[str, Any]
    num_layers: int
    dims: ModelDims
    head_params: int
    backbone_params: int
    max_params: int | None
    task_data: Any
    #: how the study records its --max-params constraint: "log10" (studies made since 2026-11-30, see
    #: `params_constraint`), or "linear" (params - limit) for an older study resumed, so one study never mixes two
    params_scale: str = "log10"

    def trial_config(self, spec: Any) -> TrialConfig:
        return TrialConfig(task=self.opts.task, spec=spec, backbone=self.opts.backbone,
                           fidelity=self.opts.fidelity, data=self.opts.data)

    def params_of(self, spec: Any) -> int:
        return peft_param_count(spec, self.dims) + self.head_params

    def fits(self, spec: Any) -> bool:
        """Whether the configuration meets --max-params (always, without one)."""
        return self.max_params is None or self.params_of(spec) <= self.max_params

    def over_budget(self, spec: Any) -> TrialFailed | None:
        """A proposal over --max-params, refused before training: its count is known in closed form, and
        training it would spend a trial's time on a point the user excluded (in a 2026-11-30 study under IA3's
        17k params, 229 of 242 trained trials were over the limit)."""
        if self.fits(spec):
            return None
        params = self.params_of(spec)
        return TrialFailed(OVER_MAX_PARAMS, f"{params:,} trainable params > --max-params {self.max_params:,}; "
                                            "not trained")

    def params_violation(self, params: int) -> float:
        """The --max-params constraint value of a configuration with `params` trainable (<= 0 feasible)."""
        assert self.max_params is not None
        if self.params_scale == "linear":
            return float(params - self.max_params)
        return params_constraint(params, self.max_params)


#: study user attribute: the scale of its --max-params constraint values (see Study.params_scale)
PARAMS_SCALE_ATTR = "params_constraint"
#: fail reason of a proposal refused before training because it is over --max-params (see Study.over_budget)
OVER_MAX_PARAMS = "over_max_params"


def params_constraint(params: int, max_params: int) -> float:
    """The --max-params constraint value (<= 0 feasible), in decades: log10(params / max_params).

    Why not `params - max_params`: parameter counts span four decades in one space (770 to 10^6 at MiniLM
    size), and the sampler's GP models the constraint as a smooth function of the encoded config. On a linear
    scale every value near a small budget is ~0 next to the 10^6 of the largest configurations, so the model
    could not tell feasible from infeasible there (95% of proposals were infeasible under a 17k budget)."""
    return math.log10(max(1, params)) - math.log10(max_params)


def check_timeout(timeout: float | None) -> None:
    """`--timeout` of `autopeft search` and of each `autopeft worker` it starts (which gets the same value)."""
    if timeout is not None and timeout < 0:
        raise UserError(f"--timeout must be >= 0 seconds, got {timeout:g}")


def prepare(opts: SearchOptions) -> Study:
    """Validate everything, then create (or load, with --resume) the study. Nothing is written before the
    inputs are known good, so a bad command leaves no half-created study behind."""
    from autopeft.sampler import make_sampler
    from autopeft.space import SearchSpace

    if opts.n_trials <= 0:
        raise UserError(f"--n-trials must be > 0, got {opts.n_trials}")
    parse_pack_size(opts.pack_size)
    if opts.proposal_batch < 1:
        raise UserError(f"--proposal-batch must be >= 1, got {opts.proposal_batch}")
    if opts.n_startup_trials < 0:
        raise UserError(f"--n-startup-trials must be >= 0, got {opts.n_startup_trials}")
    check_timeout(opts.timeout)
    use_cuda_graphs(opts.fidelity.cuda_graphs, pick_device(opts.device))  # "on" needs CUDA: exit 2 up front
    space = SearchSpace.load(opts.space)
    task_data = opts.data.load(opts.task)
    resolve_backbone(opts.backbone)
    model, _ = load_backbone(opts.backbone, task_data.num_labels, regression=task_data.is_regression)
    dims = ModelDims.from_config(model.config)
    head = head_param_count(model.config.model_type, dims.hidden, task_data.num_labels)
    backbone_params = sum(p.numel() for p in model.parameters()) - head
    del model
    num_layers = dims.num_layers
    distributions = space.distributions(num_layers)
    if not distributions:
        raise UserError(f"search space {opts.space!r} has no parameters to search")
    max_params = parse_max_params(opts.max_params, backbone_params)
    startup = feasible_startup_points(space, distributions, num_layers, opts, dims, head, max_params)

    url = storage_url(opts)
    storage = open_storage(url)
    directions = [OBJECTIVES[o] for o in opts.objectives]
    fingerprint = space_fingerprint(distributions)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    constrained = max_params is not None or opts.max_memory is not None
    sampler = make_sampler(opts.sampler, seed=opts.seed, n_startup_trials=opts.n_startup_trials,
                           constraints=constrained, n_objectives=len(directions),
                           canonical=lambda params: spec_key(space.decode(params, num_layers).to_dict()),
                           batch=max(opts.proposal_batch, most_trials(opts.pack_size)),  # one fit: a whole pack
                           room=lambda s: room_left(s, opts.n_trials))
    if opts.study_name in existing:
        if not opts.resume:
            other = existing[opts.study_name].user_attrs
            if other.get("space_fingerprint") not in (None, fingerprint):
                raise UserError(f"study {opts.study_name!r} already exists in {mask_url(url)} with another search "
                                f"space ({other.get('space')!r}, not {opts.space!r}); use a new --study name")
            raise UserError(f"study {opts.study_name!r} already exists in {mask_url(url)}; pass --resume to "
                            "continue it, or --study NAME for a new one")
        study = optuna.load_study(study_name=opts.study_name, storage=storage, sampler=sampler)
        attrs = study.user_attrs
        if attrs.get("space_fingerprint") != fingerprint:
            raise UserError(f"study {opts.study_name!r} was created with another search space "
                            f"({attrs.get('space')!r}); resume it with the same --space, or use a new --study")
        if [d.name.lower() for d in study.directions] != directions:
            raise UserError(f"study {opts.study_name!r} has other objectives; resume with the same ones")
        if attrs.get("n_trials") != opts.n_trials:
            study.set_user_attr("n_trials", opts.n_trials)  # the global budget every worker reads
        scale = attrs.get(PARAMS_SCALE_ATTR, "linear")
    else:
        study = optuna.create_study(study_name=opts.study_name, storage=storage, sampler=sampler,
                                    directions=directions)
        study.set_user_attr("task", opts.task)
        study.set_user_attr("backbone", opts.backbone)
        study.set_user_attr("space", opts.space)
        study.set_user_attr("space_fingerprint", fingerprint)
        study.set_user_attr("objectives", list(opts.objectives))
        study.set_user_attr("fidelity", opts.fidelity.to_dict())
        study.set_user_attr("selection", {"split": "heldout-from-train", "examples": heldout_size(opts, task_data),
                                          "seed": opts.fidelity.seed})
        study.set_user_attr("data", dataclasses.asdict(opts.data))
        study.set_user_attr("max_params", max_params)
        scale = "log10"
        study.set_user_attr(PARAMS_SCALE_ATTR, scale)
        study.set_user_attr("max_memory", opts.max_memory)
        study.set_user_attr("num_layers", num_layers)
        study.set_user_attr("backbone_params", backbone_params)
        study.set_user_attr("n_trials", opts.n_trials)  # the global budget every worker reads
        # what `autopeft worker` needs to rebuild these options elsewhere (URLs only password-masked)
        study.set_user_attr("search_options", {
            "n_trials": opts.n_trials, "sampler": opts.sampler, "n_startup_trials": opts.n_startup_trials,
            "proposal_batch": opts.proposal_batch, "pack_size": opts.pack_size,
            "seed": opts.seed, "heldout_examples": opts.heldout_examples, "out": str(opts.out),
            "experiment": opts.experiment, "tracking": opts.tracking,
            "tracking_uri": mask_url(opts.tracking_uri) if opts.tracking_uri else None})
        for params in startup:
            study.enqueue_trial(params, skip_if_exists=True)
    return Study(opts, study, space, distributions, num_layers, dims, head, backbone_params, max_params, task_data,
                 scale)


def room_left(study: optuna.Study, n_trials: int) -> int:
    """Trials the budget still has room for beyond those complete, running or waiting (OOM stand-ins aside)."""
    from autopeft.worker import budget_of

    live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
    return budget_of(study, n_trials) - sum(SHADOW_ATTR not in t.user_attrs for t in live)


def heldout_size(opts: SearchOptions, task_data: Any) -> int:
    return min(opts.heldout_examples, max(1, len(task_data.train) // 5))


def feasible_startup_points(space: Any, distributions: Mapping[str, Any], num_layers: int, opts: SearchOptions,
                            dims: ModelDims, head: int, max_params: int | None) -> list[dict[str, Any]]:
    """Seeded random start points that respect --max-params (known in closed form before training).

    Enqueuing them spends the random phase on configurations the user can accept; if none can be found the
    constraint is unsatisfiable and the user hears so before anything runs.
    """
    # at least one point is drawn, so that an unsatisfiable limit is caught with no random start too
    points = sample_configs(space, num_layers, random.Random(opts.seed), max(1, opts.n_startup_trials),
                            tries=200 * max(1, opts.n_startup_trials),
                            fits=lambda spec: max_params is None or peft_param_count(spec, dims) + head <= max_params)
    if max_params is not None and not points:
        smallest = head
        raise UserError(f"--max-params {opts.max_params} ({max_params:,} params) cannot be met: the task head alone "
                        f"has {smallest:,} trainable parameters and no sampled configuration fit; raise the limit")
    return points[:opts.n_startup_trials]


def sample_configs(space: Any, num_layers: int, rng: random.Random, n: int, *, tries: int,
                   fits: Callable[[PeftSpec], bool], exclude: frozenset[str] | set[str] = frozenset()
                   ) -> list[dict[str, Any]]:
    """Up to `n` seeded random points whose configuration `fits` and whose `spec_key` is not in `exclude`,
    drawing at most `tries` points; a drawn point that does not fit is shrunk until it does (`shrink_to_fit`)."""
    distributions = space.distributions(num_layers)
    seen = set(exclude)  # also each configuration once among the points themselves
    points: list[dict[str, Any]] = []
    for _ in range(tries):
        if len(points) >= n:
            break
        params = shrink_to_fit(space.random_params(rng, num_layers), distributions, rng,
                               lambda p: fits(space.decode(p, num_layers)))
        if params is None:
            continue
        key = spec_key(space.decode(params, num_layers).to_dict())
        if key not in seen:
            seen.add(key)
            points.append(params)
    return points


def shrink_to_fit(params: dict[str, Any], distributions: Mapping[str, Any], rng: random.Random,
                  fits: Callable[[dict[str, Any]], bool], max_steps: int = 500) -> dict[str, Any] | None:
    """`params` stepped down one rung at a time (a random ladder above its first rung: a rank, a size, a layer
    bit, an on/off switch) until `fits`; None when nothing is left to step down.

    Why not reject and redraw: under a tight --max-params almost no uniform draw fits (under IA3's 17k params
    at MiniLM size, 1,600 draws found only the head-only configuration), so the random start and the fresh
    points after repeats were all head-only, and the sampler's model learnt nothing of the small configurations
    the user asked for. Shrinking a random draw keeps its variety: which methods, layers and sizes survive is
    random, and each ladder ends on its smallest rung (0, off)."""
    from optuna.distributions import IntDistribution

    params = dict(params)
    for _ in range(max_steps):
        if fits(params):
            return params
        movable = [k for k, d in distributions.items() if isinstance(d, IntDistribution) and params[k] > d.low]
        if not movable:
            return None
        k = rng.choice(movable)
        params[k] -= distributions[k].step
    return params if fits(params) else None


def begin(prepared: Study, trial: optuna.Trial) -> tuple[PeftSpec, list[float] | None]:
    """The trial's configuration (recorded on it), and the values of a COMPLETE twin when it repeats one."""
    params = suggest_all(trial, prepared.distributions)
    spec = prepared.space.decode(params, prepared.num_layers)
    set_user_attrs(trial, {"spec": spec.to_dict(), "spec_summary": spec.summary()})
    twin = completed_twin(trial, spec.to_dict())
    if twin is None:
        return spec, None
    explore_next(prepared, trial)
    return spec, reuse_twin(trial, twin)


def explore_next(prepared: Study, trial: optuna.Trial) -> None:
    """Enqueue a fresh random point (`fresh_point`) for the next trial, after a proposal that taught nothing
    new: a repeat, or one refused for --max-params, so the next trial explores instead of landing there again."""
    fresh = fresh_point(prepared, trial)
    if fresh is not None:
        trial.study.enqueue_trial(fresh, skip_if_exists=True)


def record_failure(prepared: Study, trial: optuna.Trial, spec: PeftSpec, exc: TrialFailed) -> None:
    """Why the trial failed, on the trial; an OOM also tells the sampler the configuration does not fit."""
    from autopeft.worker import record_infeasible

    set_user_attrs(trial, {FAIL_REASON: exc.reason, "autopeft.fail_detail": exc.detail[:500]})
    if exc.reason == "oom":
        if exc.memory_mb is not None:
            trial.set_user_attr("peak_memory_mb", exc.memory_mb)  # measured up to the failure
        record_infeasible(prepared, trial, spec, exc.memory_mb)  # so the sampler stops proposing it
    elif exc.reason == OVER_MAX_PARAMS:
        record_infeasible(prepared, trial, spec, None, reason=OVER_MAX_PARAMS)
        explore_next(prepared, trial)


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """`trial.set_user_attr` for many keys in one storage transaction where the storage is Optuna's RDB one.

    Each `set_user_attr` is its own commit (a few ms on SQLite, a round trip on PostgreSQL), and a finished
    trial records ~20 measurements: 60 ms of every CPU trial's overhead. Optuna has no public call for several
    attributes, so this uses the RDB storage's own per-attribute write inside one session; any other storage,
    or an Optuna whose internals differ, gets the one-by-one public calls.
    """
    try:
        from optuna.storages import RDBStorage
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        storage = trial.storage
        backend = getattr(storage, "_backend", storage)
        write = backend._set_trial_attr_without_commit if isinstance(backend, RDBStorage) else None
        cached = trial._cached_frozen_trial.user_attrs
    except (ImportError, AttributeError):
        write = None
    if write is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    with _create_scoped_session(backend.scoped_session, True) as session:
        for key, value in attrs.items():
            write(session, models.TrialUserAttributeModel, trial._trial_id, key, value)
    cached.update(attrs)


def record_result(prepared: Study, trial: optuna.Trial, result: Any) -> list[float]:
    """Save the trained tensors, put every measurement on the trial, and return its objective values."""
    opts = prepared.opts
    m = result.metrics
    attrs: dict[str, Any] = {"weights_path": str(save_trial_weights(opts, trial.number, result.model))}
    attrs |= {key: value for key, value in m.to_dict().items() if key != "extra" and value is not None}
    attrs["extra"] = dict(m.extra)
    curve = result.loss_curve
    stride = max(1, len(curve) // 500)  # the curve is for plots: at most ~500 points in the storage
    attrs["loss_curve"] = [round(x, 5) for x in curve[::stride]]
    attrs["loss_curve_stride"] = stride
    constraints = []
    if prepared.max_params is not None:
        constraints.append(prepared.params_violation(m.trainable_params))
    if opts.max_memory is not None:
        constraints.append(float(m.peak_memory_mb - opts.max_memory))
    attrs["constraints"] = constraints
    set_user_attrs(trial, attrs)
    return objective_values(m, opts.objectives)


def _oom(exc: BaseException) -> TrialFailed:
    return TrialFailed("oom", str(exc).splitlines()[0] if str(exc) else "out of memory")


def objective(prepared: Study) -> Callable[[optuna.Trial], list[float]]:
    """One trial: propose, train (`train.run_trial`, scored on the held-out split), record."""
    opts = prepared.opts

    def run(trial: optuna.Trial) -> list[float]:
        import torch

        from autopeft import train

        spec, reused = begin(prepared, trial)
        if reused is not None:
            return reused
        refused = prepared.over_budget(spec)
        if refused is not None:
            record_failure(prepared, trial, spec, refused)
            raise refused
        token = train.CURRENT_TRIAL.set(trial.number)  # for AUTOPEFT_INJECT_FAULT (tests and drills)
        try:
            try:
                result = run_trial(prepared.trial_config(spec), task=prepared.task_data, select="heldout",
                                   heldout_fraction=heldout_size(opts, prepared.task_data)
                                   / len(prepared.task_data.train), device=opts.device, progress=opts.progress)
            except torch.cuda.OutOfMemoryError as exc:  # outside the training loop (loading, evaluation)
                raise _oom(exc) from None
        except TrialFailed as exc:
            record_failure(prepared, trial, spec, exc)
            raise
        finally:
            train.CURRENT_TRIAL.reset(token)
        return record_result(prepared, trial, result)

    return run


#: user attribute of a packed trial: {"first": the pack's first trial number, "size": K, "tokens_per_s": ...}
PACK_ATTR = "autopeft.pack"


def pack_objective(prepared: Study, planner: PackPlanner | None = None
                   ) -> Callable[[list[optuna.Trial]], list[list[float] | TrialFailed]]:
    """K trials trained together on one shared frozen backbone (`packing.train_pack`), each recorded on its own.

    A repeat of an earlier configuration reuses its twin's values and leaves the pack; a trial that fails
    (NaN) fails alone; an error of the pack as a whole (OOM while building it, say) fails each of its trials
    with that reason. `planner` (`--pack-size auto`) learns each pack's memory, or its running out of it.
    """
    opts = prepared.opts

    def run(trials: list[optuna.Trial]) -> list[list[float] | TrialFailed]:
        import torch

        from autopeft.packing import train_pack

        outcomes: list[Any] = [None] * len(trials)  # values or TrialFailed: every slot is filled below
        todo: list[tuple[int, optuna.Trial, PeftSpec]] = []
        for i, trial in enumerate(trials):
            spec, reused = begin(prepared, trial)
            refused = prepared.over_budget(spec) if reused is None else None
            if reused is not None:
                outcomes[i] = reused
            elif refused is not None:
                record_failure(prepared, trial, spec, refused)
                outcomes[i] = refused
            else:
                todo.append((i, trial, spec))
        if todo:
            try:
                try:
                    pack = train_pack([prepared.trial_config(spec) for _, _, spec in todo],
                                      task=prepared.task_data, select="heldout",
                                      heldout_fraction=heldout_size(opts, prepared.task_data)
                                      / len(prepared.task_data.train),
                                      device=opts.device, trial_numbers=[t.number for _, t, _ in todo])
                except torch.cuda.OutOfMemoryError as exc:
                    raise _oom(exc) from None
                results: list[Any] = list(pack.results)
                info = {"first": todo[0][1].number, "size": len(todo),
                        "tokens_per_s": round(pack.stats.tokens_per_s, 1),
                        "peak_memory_mb": round(pack.stats.peak_memory_mb, 1),
                        "backbone_memory_mb": round(pack.stats.backbone_memory_mb, 1)}
            except TrialFailed as exc:
                results, info = [exc] * len(todo), None
            if planner is not None:
                oom = any(isinstance(r, TrialFailed) and r.reason == "oom" for r in results)
                planner.observe(len(todo), info["peak_memory_mb"] if info else 0.0,
                                info["backbone_memory_mb"] if info else 0.0, out_of_memory=oom)
            for (i, trial, spec), result in zip(todo, results, strict=True):
                if info is not None:
                    trial.set_user_attr(PACK_ATTR, info)
                if isinstance(result, TrialFailed):
                    record_failure(prepared, trial, spec, result)
                    outcomes[i] = result
                else:
                    outcomes[i] = record_result(prepared, trial, result)
        return outcomes

    return run


#: user attribute naming the earlier trial whose measurements a repeated configuration reuses
DUPLICATE_OF = "autopeft.duplicate_of"
_MEASURED = ("metric_name", "metric", "dev_metric", "trainable_params", "trainable_pct", "backbone_params",
             "peak_memory_mb", "train_seconds", "eval_seconds", "tokens_per_s", "train_loss", "steps", "extra",
             "weights_path", "loss_curve", "loss_curve_stride", "constraints")


def completed_twin(trial: optuna.Trial, spec: dict[str, Any]) -> FrozenTrial | None:
    """A COMPLETE trial of this study with exactly this spec (same study = same fidelity, data and seed).

    The sampler can propose a configuration twice (most often the head-only point, which sits on every front).
    Training it again would reproduce the same numbers at the cost of a whole trial, so its measurements are
    reused instead; the trial says so (`autopeft.duplicate_of`).
    """
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != trial.number and t.user_attrs.get("spec") == spec and "metric" in t.user_attrs \
                and SHADOW_ATTR not in t.user_attrs:
            return t
    return None


def spec_key(spec: Mapping[str, Any]) -> str:
    """Equal for equal configurations (a `PeftSpec.to_dict()`), whatever params produced them."""
    import json

    return json.dumps(spec, sort_keys=True)


def fresh_point(prepared: Study, trial: optuna.Trial, tries: int = 200) -> dict[str, Any] | None:
    """A seeded random point whose configuration no trial has had yet and that meets --max-params.

    A repeat usually means the acquisition's continuous optimum rounded onto a degenerate region of the space
    (every layer bit off decodes to the same head-only spec, whatever the sizes), and the next proposal would
    land there again. One random, new configuration after each repeat keeps the search moving.
    """
    known = {spec_key(t.user_attrs["spec"]) for t in trial.study.get_trials(deepcopy=False) if "spec" in t.user_attrs}
    points = sample_configs(prepared.space, prepared.num_layers,
                            random.Random(prepared.opts.seed * 100_003 + trial.number), 1, tries=tries,
                            fits=prepared.fits, exclude=known)
    return points[0] if points else None


def reuse_twin(trial: optuna.Trial, twin: FrozenTrial) -> list[float]:
    for key in _MEASURED:
        if key in twin.user_attrs:
            trial.set_user_attr(key, twin.user_attrs[key])
    trial.set_user_attr(DUPLICATE_OF, twin.user_attrs.get(DUPLICATE_OF, twin.number))
    return list(twin.values)


def trial_dir(opts: SearchOptions, number: int) -> Path:
    return (Path(opts.out) / "artifacts" / opts.study_name / f"trial-{number}").resolve()


def save_trial_weights(opts: SearchOptions, number: int, model: Any) -> Path:
    """Keep each trial's trained tensors (trainable only, safetensors) so export never has to retrain."""
    from safetensors.torch import save_file

    from autopeft.peft import trainable_state_dict

    path = trial_dir(opts, number) / "autopeft_weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(trainable_state_dict(model), str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


def completed(study: optuna.Study) -> int:
    """COMPLETE trials toward the budget (the COMPLETE stand-ins of OOM trials, `autopeft.shadow_of`, excluded).

    Repeats of an earlier configuration (`autopeft.duplicate_of`) count: they are rare with BoTorch (which
    proposes new configurations only) and cost no training, and counting every COMPLETE trial keeps the
    budget exact across workers."""
    return sum(SHADOW_ATTR not in t.user_attrs
               for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def run_search(opts: SearchOptions, *, echo: Callable[[str], None] = print) -> optuna.Study:
    """Run (or continue) a study until it has `n_trials` COMPLETE trials or `timeout` seconds pass."""
    prepared = prepare(opts)
    study = prepared.study
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    remaining = opts.n_trials - completed(study)
    echo(f"study {opts.study_name!r} on {mask_url(storage_url(opts))}: {opts.task}, backbone {opts.backbone}, "
         f"space {opts.space} ({len(prepared.distributions)} parameters), sampler {opts.sampler}, "
         f"{completed(study)}/{opts.n_trials} trials done")
    tracker = start_tracking(opts, study, echo)
    if remaining <= 0:
        if tracker:
            tracker.finish(study)
        return study
    if opts.workers is not None and opts.workers > 1:  # N `autopeft worker` processes share the global budget
        from autopeft.worker import spawn_workers

        started = time.time()
        try:
            codes = spawn_workers(opts, storage_url(opts), opts.workers, echo=echo)
        finally:
            if tracker:
                tracker.finish(study)
        if any(codes):
            echo(f"autopeft: warning: worker exit codes {codes}")
        echo(f"{completed(study)} trials complete in {time.time() - started:.0f}s with {opts.workers} workers")
        return study
    from tqdm.auto import tqdm

    bar = tqdm(total=opts.n_trials, initial=completed(study), desc="trials", unit="trial", dynamic_ncols=True,
               disable=not opts.progress or not sys.stderr.isatty())

    def after(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.COMPLETE and DUPLICATE_OF in trial.user_attrs:
            bar.update(1)
            line = (f"trial {trial.number:3d}  repeats trial {trial.user_attrs[DUPLICATE_OF]}'s configuration: "
                    "its measurements are reused, nothing trained; a new configuration is queued")
        elif trial.state == TrialState.COMPLETE:
            bar.update(1)
            a = trial.user_attrs
            line = (f"trial {trial.number:3d}  {a.get('metric_name', 'metric')} {a.get('metric', float('nan')):.4f}"
                    f" (dev {a.get('dev_metric', float('nan')):.4f})  params {a.get('trainable_params', 0):>9,}"
                    f" ({a.get('trainable_pct', 0):.3f}%)  mem {a.get('peak_memory_mb', 0):8.1f} MiB"
                    f"  {a.get('train_seconds', 0):6.1f}s  {a.get('spec_summary', '')}")
        else:
            line = f"trial {trial.number:3d}  {trial.state.name} ({trial.user_attrs.get(FAIL_REASON, 'error')})"
        bar.write(line) if bar.disable is False else echo(line)
        if tracker:
            tracker.log_trial(study, trial)  # never raises: retries, then records the failure on the study
        if completed(study) >= opts.n_trials and not packs(opts.pack_size):  # the packed loop checks the budget
            study.stop()

    run = objective(prepared)

    def tracked(trial: optuna.Trial) -> list[float]:
        if tracker:
            tracker.begin_trial(trial)  # the child run shows RUNNING, and its id is a user attr of the trial
        return run(trial)

    started = time.time()
    # Everything alive now (torch, transformers, BoTorch, MLflow, the task and its tokenisation) lives for the
    # whole search: frozen, the collection after each trial only walks what the trial made (0.25 s -> ~0 s).
    gc.freeze()
    try:
        sizes: list[int] = []
        if packs(opts.pack_size):
            sizes = _run_packed(prepared, tracker, after)
        else:
            study.optimize(tracked, n_trials=2 * remaining + 2, timeout=opts.timeout,
                           callbacks=[after], catch=(TrialFailed,), gc_after_trial=True, show_progress_bar=False)
    finally:
        gc.unfreeze()  # frozen objects are never finalised: some bindings then report leaks at exit
        bar.close()
        if tracker:
            tracker.finish(study)  # logs what a crash or an outage left out, ends the parent run
    echo(f"{completed(study)} trials complete in {time.time() - started:.0f}s{_packs_note(opts.pack_size, sizes)}")
    return study


def _run_packed(prepared: Study, tracker: Any, after: Callable[[optuna.Study, FrozenTrial], None]) -> list[int]:
    """The search loop with trial packing: packs of up to `pack_size` trials (or as many as memory holds, under
    `auto`) until the budget or the timeout. Returns the sizes `auto` planned (empty for a fixed size)."""
    from autopeft.worker import Stop, pack_with_tracking, work

    opts = prepared.opts
    planner = pack_planner(prepared)
    stop = Stop().install()  # Ctrl-C: the pack in flight finishes (or fails `sigterm` after the grace period)
    try:
        work(prepared.study, objective(prepared), budget=lambda: opts.n_trials, stop=stop, after=after,
             pack=pack_with_tracking(pack_objective(prepared, planner), tracker),
             pack_size=planner.size if planner else int(opts.pack_size), distributions=prepared.distributions,
             deadline=None if opts.timeout is None else time.time() + opts.timeout)
    finally:
        stop.uninstall()
    return planner.sizes if planner else []


def pack_planner(prepared: Study) -> PackPlanner | None:
    """`--pack-size auto`'s planner for this study on its device (None for a fixed size), from the estimate."""
    if prepared.opts.pack_size != AUTO:
        return None
    from autopeft.packing import CUDA_BF16

    device = pick_device(prepared.opts.device)
    fid = prepared.opts.fidelity
    return PackPlanner.estimated(device, backbone_params=prepared.backbone_params, hidden=prepared.dims.hidden,
                                 num_layers=prepared.dims.num_layers, batch_size=fid.batch_size,
                                 max_length=fid.max_length, bf16=device.type == "cuda" and CUDA_BF16)


def _packs_note(pack_size: int | str, sizes: list[int]) -> str:
    if pack_size == AUTO:
        return f" (packs sized by memory: {', '.join(map(str, sizes)) or 'none'})"
    return f" (packs of up to {pack_size})" if packs(pack_size) else ""


def start_tracking(opts: SearchOptions, study: optuna.Study, echo: Callable[[str], None]) -> Any:
    """The study's MLflow tracker, started (None with --no-tracking). Starting never raises: a store that is
    down is retried, recorded on the study, and caught up on later (see autopeft.tracking)."""
    if not opts.tracking:
        return None
    from autopeft.tracking import Tracker

    tracker = Tracker.for_search(opts)
    tracker.start(study)
    if tracker.parent_run_id:
        echo(f"MLflow: {tracker.masked_uri} (parent run {tracker.parent_run_id}); browse it with `autopeft ui"
             + (f" --out {opts.out}`" if tracker.embedded else f" --tracking-uri {tracker.masked_uri}`"))
    return tracker


def search_command(task: str, overrides: Mapping[str, Any]) -> optuna.Study:
    """`autopeft search`: preset + flags -> run the study -> print the front."""
    import torch

    from autopeft.front import format_front, front_rows

    data_keys = {f.name for f in dataclasses.fields(DataOptions)}
    fid_keys = {f.name for f in dataclasses.fields(Fidelity)}
    data = {k: overrides[k] for k in data_keys if overrides.get(k) not in (None, False)}
    fid = {k: overrides[k] for k in fid_keys if overrides.get(k) is not None}
    rest = {k: v for k, v in overrides.items() if k not in data_keys | fid_keys}
    gpu = (rest.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    opts = options_from_preset(task, {**rest, "data": DataOptions(**data) if data else None}, gpu=gpu)
    if fid:
        opts = dataclasses.replace(opts, fidelity=dataclasses.replace(opts.fidelity, **fid))
    study = run_search(opts)
    print(f"\nPareto front of {opts.study_name!r} ({', '.join(opts.objectives)}):")
    print(format_front(front_rows(study)))
    return study
