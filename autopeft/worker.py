"""A worker: asks the study for trials, trains them, tells the results; any number of them, on any machines.

Everything shared lives in Optuna's RDB storage (SQLite on one machine, PostgreSQL for many); there is no
queue, lock or server of our own:

* Budget. The study keeps its budget as the user attribute `n_trials`. A trial counts once it is *live*
  (RUNNING or COMPLETE). Before asking, a worker waits while the live trials already fill the budget (a running
  one may still fail and free its place); after asking, it checks its own rank among the live trials, ordered
  by the moment they became live (`datetime_start`, then number). A trial ranked past the budget is PRUNED
  with reason `surplus` before it trains, so N workers together finish exactly `n_trials` COMPLETE trials.
  Whichever of two racing workers checks second sees the other (the storage is shared), so only one of them
  can take the last place; clocks of different machines are assumed NTP-synchronised.
* Heartbeats. Every trial beats (`open_storage` sets the interval); a trial whose worker died is failed by the
  next worker that looks (`fail_stale_trials`), its reason `heartbeat` kept on the study (a finished trial takes
  no attributes) and its parameters re-queued, twice at most (`RetryCallback`).
* SIGTERM. The first one lets the running trial finish within `grace` seconds, then the worker exits 0; past
  the grace (or on a second signal) the trial is failed with reason `sigterm` and re-queued the same way.
* Failures. OOM, NaN and crashes end the trial FAILED with a reason (`autopeft.fail_reason`); none stops the
  study. An OOM trial is also shown to the sampler as infeasible (see `record_infeasible`).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autopeft.errors import TrialFailed, UserError
from autopeft.pack_size import parse_pack_size

FAIL_REASON = "autopeft.fail_reason"
FAIL_DETAIL = "autopeft.fail_detail"
BUDGET_ATTR = "n_trials"
OPTIONS_ATTR = "search_options"
#: user attribute of the COMPLETE stand-in that tells the sampler a trial was infeasible (OOM, over --max-params);
#: the one definition: search, tracking, the report and export import it
SHADOW_ATTR = "autopeft.shadow_of"
WORKER_ATTR = "autopeft.worker"  # host:pid of the worker that ran the trial
RETRY_OF = "autopeft.retry_of"
RETRY_REASON = "autopeft.retry_reason"
STUDY_FAIL_REASON = "autopeft.fail_reason."  # + number: reasons of trials failed after they finished (stale)
MAX_RETRY = 2
DEFAULT_GRACE_S = 60.0
STORAGE_ENV = "AUTOPEFT_STORAGE"  # spawned workers get the URL here, never on a command line `ps` shows
TRACKING_ENV = "AUTOPEFT_TRACKING_URI"


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: 10 and 30, or `AUTOPEFT_HEARTBEAT_S` / `AUTOPEFT_GRACE_S`."""
    interval = int(os.environ.get("AUTOPEFT_HEARTBEAT_S", "10"))
    grace = int(os.environ.get("AUTOPEFT_GRACE_S", str(3 * interval)))
    return max(1, interval), max(interval + 1, grace)


# ----- reasons and retries -----------------------------------------------------------------------------------
def fail_reason(study: optuna.Study, trial: FrozenTrial) -> str | None:
    """Why a FAILED trial failed: its own attribute, or the study's note for a trial failed from outside."""
    return trial.user_attrs.get(FAIL_REASON) or study.user_attrs.get(f"{STUDY_FAIL_REASON}{trial.number}")


class RetryCallback:
    """Re-queue a failed trial's parameters (WAITING) at most `max_retry` times along its retry chain.

    Same system attributes as Optuna's `RetryFailedTrialCallback` (`failed_trial`, `retry_history`), plus
    the reason kept twice: on the study (`autopeft.fail_reason.<n>`, since a FAILED trial cannot take
    attributes any more) and on the retry (`autopeft.retry_of`, `autopeft.retry_reason`).
    """

    def __init__(self, max_retry: int = MAX_RETRY, reason: str = "heartbeat") -> None:
        self.max_retry = max_retry
        self.reason = reason

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        try:
            if not trial.user_attrs.get(FAIL_REASON):
                study.set_user_attr(f"{STUDY_FAIL_REASON}{trial.number}", self.reason)
            history = [*trial.system_attrs.get("retry_history", []), trial.number]
            if len(history) > self.max_retry:
                return
            system = {**trial.system_attrs, "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                      "retry_history": history}
            keep = {k: v for k, v in trial.user_attrs.items() if k in ("spec", "spec_summary")}
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
                user_attrs={**keep, RETRY_OF: trial.number, RETRY_REASON: self.reason}, system_attrs=system))
        except Exception as exc:
            print(f"autopeft: warning: could not re-queue trial {trial.number}: {type(exc).__name__}",
                  file=sys.stderr)


# ----- budget -------------------------------------------------------------------------------------------------
def _live(study: optuna.Study) -> list[FrozenTrial]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    return [t for t in trials if SHADOW_ATTR not in t.user_attrs]


def counts(study: optuna.Study) -> tuple[int, int]:
    """(COMPLETE, RUNNING) trials of the study, OOM stand-ins excluded."""
    live = _live(study)
    complete = sum(t.state == TrialState.COMPLETE for t in live)
    return complete, len(live) - complete


def _order(t: FrozenTrial) -> tuple[datetime, int]:
    return (t.datetime_start or datetime.max, t.number)


def is_surplus(study: optuna.Study, trial: optuna.Trial, budget: int) -> bool:
    """True when the live trials that became live before this one already fill the budget."""
    mine = study._storage.get_trial(trial._trial_id)
    before = [t for t in _live(study) if t.number != mine.number and _order(t) < _order(mine)]
    return len(before) >= budget


def budget_of(study: optuna.Study, default: int | None = None) -> int:
    value = study.user_attrs.get(BUDGET_ATTR, default)
    if value is None:
        raise UserError(f"study {study.study_name!r} has no trial budget ({BUDGET_ATTR}); was it made by autopeft?")
    return int(value)


# ----- signals --------------------------------------------------------------------------------------------------
class Stop:
    """SIGTERM/SIGINT handling: finish the trial within `grace` seconds, else fail it with reason `sigterm`."""

    def __init__(self, grace: float = DEFAULT_GRACE_S) -> None:
        self.grace = grace
        self.requested = threading.Event()
        self.in_trial = False
        self._timer: threading.Timer | None = None
        self._installed: dict[int, Any] = {}

    def install(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._installed[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, old in self._installed.items():
            signal.signal(sig, old)
        self._installed.clear()
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handle(self, signum: int, frame: Any) -> None:
        again = self.requested.is_set()
        self.requested.set()
        if not self.in_trial:
            return
        if again or self.grace <= 0:
            self.abort_trial("signal received again" if again else "no grace period")
        elif self._timer is None:
            print(f"autopeft: worker {os.getpid()}: stopping after this trial (at most {self.grace:.0f}s more)",
                  file=sys.stderr, flush=True)
            # the alarm lands in the main thread, i.e. inside the training loop
            self._timer = threading.Timer(self.grace, lambda: os.kill(os.getpid(), signal.SIGUSR1))
            self._timer.daemon = True
            self._timer.start()
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGUSR1, lambda *_: self.abort_trial(f"grace of {self.grace:.0f}s ran out"))

    def abort_trial(self, why: str) -> None:
        if self.in_trial:
            self.in_trial = False
            raise TrialFailed("sigterm", f"worker stopped: {why}")

    def trial_ended(self) -> None:
        self.in_trial = False
        self._cancel_timer()


# ----- the loop ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class WorkStats:
    complete: int = 0
    failed: int = 0
    surplus: int = 0
    storage_errors: int = 0
    numbers: list[int] = dataclasses.field(default_factory=list)


def _storage_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(exc, (SQLAlchemyError, optuna.exceptions.StorageInternalError, ConnectionError, OSError))


def work(study: optuna.Study, objective: Callable[[optuna.Trial], Any], *, budget: Callable[[], int] | None = None,
         stop: Stop | None = None, after: Callable[[optuna.Study, FrozenTrial], None] | None = None,
         echo: Callable[[str], None] = print, poll_s: float = 1.0, max_storage_errors: int = 20,
         pack: Callable[[list[optuna.Trial]], list[Any]] | None = None, pack_size: int | Callable[[], int] = 1,
         distributions: dict[str, Any] | None = None, deadline: float | None = None) -> WorkStats:
    """Run trials of `study` until its budget is complete, a stop is requested or `deadline` (time.time()) passes.

    `objective` is the whole trial (search.py's, or a fast stand-in for load tests); exceptions other than
    `TrialFailed` become FAILED with reason `crash`, so no trial ever stops the loop. Storage errors are
    retried with backoff (and counted); `max_storage_errors` in a row end the worker.

    With `pack` and `pack_size` > 1, up to `pack_size` trials are asked at once (as many as the budget has room
    for; BoTorch proposes them as one q-batch), trained together by `pack` (search.py's `pack_objective`: one
    outcome per trial, values or `TrialFailed`), and each is told its own outcome. A callable `pack_size` is
    asked before each pack (`--pack-size auto`: `autopeft.pack_size.PackPlanner.size`). `distributions` (the
    study's) are sampled when a trial is asked rather than when the pack starts, so that the first ask's
    q-batch is already waiting when the next trials of the pack are asked.
    """
    stop = stop or Stop()
    stats = WorkStats()
    budget = budget or (lambda: budget_of(study))
    run_in_a_row = 0
    last: list[FrozenTrial] = []

    def guarded(trial: optuna.Trial) -> Any:
        if is_surplus(study, trial, budget()):
            trial.set_user_attr(FAIL_REASON, "surplus")
            raise optuna.TrialPruned("the study's budget was reached by other workers")
        optuna_trial_set(trial)
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        stop.in_trial = True
        try:
            return objective(trial)
        except TrialFailed as exc:
            if not trial.user_attrs.get(FAIL_REASON):
                _set_reason(trial, exc.reason, exc.detail)
            raise
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            _set_reason(trial, "crash", f"{type(exc).__name__}: {exc}")
            raise TrialFailed("crash", f"{type(exc).__name__}: {exc}") from exc
        finally:
            stop.trial_ended()

    def optuna_trial_set(trial: optuna.Trial) -> None:
        from autopeft import train

        train.CURRENT_TRIAL.set(trial.number)

    def capture(_: optuna.Study, trial: FrozenTrial) -> None:
        last.append(trial)

    while not stop.requested.is_set():
        if deadline is not None and time.time() >= deadline:
            break
        try:
            target = budget()
            complete, running = counts(study)
            if complete >= target:
                break
            if complete + running >= target:  # full for now; a running trial may still fail and free a place
                fail_stale(study)
                stop.requested.wait(poll_s)
                continue
            last.clear()
            if pack is not None and (callable(pack_size) or pack_size > 1):
                k = pack_size() if callable(pack_size) else pack_size
                last.extend(_run_pack(study, pack, min(k, target - complete - running), budget(), stop,
                                      distributions))
            else:
                study.optimize(guarded, n_trials=1, catch=(TrialFailed,), callbacks=[capture], gc_after_trial=False,
                               show_progress_bar=False)
            run_in_a_row = 0
        except Exception as exc:
            if not _storage_error(exc):
                raise
            stats.storage_errors += 1
            run_in_a_row += 1
            echo(f"autopeft: storage error ({type(exc).__name__}), retrying: {_first_line(exc)}")
            if run_in_a_row >= max_storage_errors:
                raise
            time.sleep(min(10.0, 0.2 * 2 ** run_in_a_row))
            continue
        for trial in last:
            stats.numbers.append(trial.number)
            if trial.state == TrialState.COMPLETE:
                stats.complete += 1
            elif trial.state == TrialState.PRUNED:
                stats.surplus += 1
            else:
                stats.failed += 1
                if trial.user_attrs.get(FAIL_REASON) == "sigterm":
                    RetryCallback(reason="sigterm")(study, trial)
            if after is not None:
                after(study, trial)
    return stats


def fail_stale(study: optuna.Study) -> None:
    """Fail (and, through the storage's callback, retry) trials whose heartbeat stopped: a dead worker's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _run_pack(study: optuna.Study, pack: Callable[[list[optuna.Trial]], list[Any]], k: int, target: int,
              stop: Stop, distributions: dict[str, Any] | None = None) -> list[FrozenTrial]:
    """Ask `k` trials, train them as one pack under heartbeats, tell each its outcome; the told trials."""
    from contextlib import ExitStack

    from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled

    from autopeft import train

    if is_heartbeat_enabled(study._storage):
        fail_stale(study)
    trials, surplus = [], []
    for _ in range(max(1, k)):
        with warnings.catch_warnings():  # heartbeats are started below, as Study.optimize would
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask(distributions)
        (surplus if is_surplus(study, trial, target) else trials).append(trial)
    for trial in surplus:  # another worker filled the budget meanwhile
        trial.set_user_attr(FAIL_REASON, "surplus")
        study.tell(trial, state=TrialState.PRUNED)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    outcomes: list[Any] = []
    with ExitStack() as beats:
        for trial in trials:
            beats.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
            trial.set_user_attr(WORKER_ATTR, worker)
        stop.in_trial = True
        token = train.CURRENT_TRIAL.set(trials[0].number if trials else None)
        try:
            outcomes = pack(trials) if trials else []
        except TrialFailed as exc:  # the pack as a whole (a stop signal's grace ran out, say)
            outcomes = [exc] * len(trials)
        except Exception as exc:
            outcomes = [TrialFailed("crash", f"{type(exc).__name__}: {exc}")] * len(trials)
        finally:
            train.CURRENT_TRIAL.reset(token)
            stop.trial_ended()
            # a pack's models, optimisers and graphs hold reference cycles: collected now, not whenever the
            # collector gets to them, or their GPU memory stays allocated under the next pack (on an H200 the
            # memory allocated before a pack went 664, 996, 1,415, 2,023 MiB over four packs without this,
            # bench/results/pack_size_auto_nogc-h200-2026-11-30.json, and 664, 996, 1,275, 1,398 with it,
            # pack_size_auto_gc-; the rest was the packs' stacks, which no collection could free: see
            # `packing._Stack`; with both, 664, 804, 798, 783: pack_size_auto-);
            # `study.optimize(gc_after_trial=True)` does the same for a trial run alone
            gc.collect()
    for trial, outcome in zip(trials, outcomes, strict=True):
        if isinstance(outcome, TrialFailed):
            if not study._storage.get_trial(trial._trial_id).user_attrs.get(FAIL_REASON):
                _set_reason(trial, outcome.reason, outcome.detail)
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, outcome)
    return [study._storage.get_trial(t._trial_id) for t in (*trials, *surplus)]


def _set_reason(trial: optuna.Trial, reason: str, detail: str) -> None:
    try:
        trial.set_user_attr(FAIL_REASON, reason)
        trial.set_user_attr(FAIL_DETAIL, detail[:500])
    except Exception:
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# ----- OOM as infeasible --------------------------------------------------------------------------------------------
def record_infeasible(prepared: Any, trial: optuna.Trial, spec: Any, memory_mb: float | None,
                      reason: str = "oom") -> None:
    """Tell the sampler that this configuration does not fit, while the trial itself stays FAILED `reason`
    (`oom`, or `over_max_params`: refused before training, see search.Study.over_budget).

    Optuna's samplers learn only from COMPLETE trials: BoTorch's fits its GP on COMPLETE ones (RUNNING ones
    only as pending points), TPE and NSGA-II read COMPLETE trials and their `constraints` system attribute.
    A FAILED trial is invisible to all of them, so a sampler would keep proposing configurations that run out
    of memory. Next to the FAILED trial we therefore add one COMPLETE stand-in (user attribute
    `autopeft.shadow_of` = the trial's number) with the same parameters and

    * every constraint violated (> 0, in user attribute `constraints` and Optuna's `constraints` system
      attribute; the --max-params one is its true value when the trial was refused for it), which
      constraint-aware samplers (BoTorch's constrained qLogNEHVI, TPE, NSGA-II) model as infeasible, and which
      keeps the stand-in off every front (`pareto.is_feasible`);
    * pessimistic objective values (the worst metric seen, the params it would have had or more, the memory
      it reached or the most seen), so a sampler without constraints also learns the region is bad.

    The stand-in never counts toward the budget, never appears in a front, and is skipped by `counts`.
    """
    from autopeft.search import OVER_MAX_PARAMS

    try:
        study = trial.study
        opts = prepared.opts
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if SHADOW_ATTR not in t.user_attrs]
        attrs = [t.user_attrs for t in done]
        metrics = [a["metric"] for a in attrs if isinstance(a.get("metric"), (int, float))]
        mems = [a["peak_memory_mb"] for a in attrs if isinstance(a.get("peak_memory_mb"), (int, float))]
        params = prepared.params_of(spec)
        table = {"metric": (min(metrics) - 0.1 * (max(metrics) - min(metrics) or 1.0)) if metrics else 0.0,
                 "params": math.log10(max(1, params)),
                 "memory": max([memory_mb or 0.0, *mems])}
        values = [float(table[o]) for o in opts.objectives]
        constraints = []
        if prepared.max_params is not None:
            over = prepared.params_violation(params)
            constraints.append(over if reason == OVER_MAX_PARAMS else max(1.0, over))
        if opts.max_memory is not None:
            constraints.append(max(1.0, float((memory_mb or 0.0) - opts.max_memory)))
        user = {SHADOW_ATTR: trial.number, FAIL_REASON: reason, "constraints": constraints or [1.0],
                "spec_summary": trial.user_attrs.get("spec_summary", "")}
        system = {"constraints": constraints} if constraints else {}
        study.add_trial(optuna.trial.create_trial(params=trial.params, distributions=trial.distributions,
                                                  values=values, user_attrs=user, system_attrs=system))
    except Exception as exc:
        print(f"autopeft: warning: could not record trial {trial.number} as infeasible: {type(exc).__name__}",
              file=sys.stderr)


# ----- `autopeft worker` ---------------------------------------------------------------------------------------------
def load_study_or_explain(name: str, url: str) -> optuna.Study:
    from autopeft.search import mask_url, open_storage

    storage = open_storage(url)
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
    if name not in names:
        raise UserError(f"no study named {name!r} in {mask_url(url)}; studies there: {', '.join(names) or 'none'} "
                        "(create it with `autopeft search --storage URL --study NAME`)")
    return optuna.load_study(study_name=name, storage=storage)


def options_from_study(study: optuna.Study, storage_url: str, *, tracking_uri: str | None = None,
                       out: str | None = None, device: str | None = None) -> Any:
    """The SearchOptions a study was created with, read back from its user attributes."""
    from autopeft.search import SearchOptions
    from autopeft.spec import Fidelity
    from autopeft.train import DataOptions

    a = study.user_attrs
    saved = dict(a.get(OPTIONS_ATTR) or {})
    if "task" not in a or "space" not in a:
        raise UserError(f"study {study.study_name!r} was not created by `autopeft search` (no task/space recorded)")
    return SearchOptions(
        task=a["task"], study=study.study_name, out=out or saved.get("out") or "autopeft-runs", storage=storage_url,
        tracking_uri=_tracking_uri(tracking_uri, saved), experiment=saved.get("experiment"),
        tracking=bool(saved.get("tracking", True)), space=a["space"], backbone=a["backbone"],
        data=DataOptions(**(a.get("data") or {})), n_trials=budget_of(study, saved.get("n_trials")),
        sampler=saved.get("sampler", "botorch"), n_startup_trials=int(saved.get("n_startup_trials", 6)),
        proposal_batch=int(saved.get("proposal_batch", 1)),
        pack_size=parse_pack_size(saved.get("pack_size", 1), "the study's pack_size"),
        # each worker its own seed: N workers of one seed would propose the same configurations N times
        seed=int(saved.get("seed", 0)) + os.getpid(),
        max_params=None if a.get("max_params") is None else str(a["max_params"]),
        max_memory=a.get("max_memory"), objectives=tuple(a.get("objectives") or ("metric",)),
        heldout_examples=int(saved.get("heldout_examples", (a.get("selection") or {}).get("examples", 1000))),
        fidelity=Fidelity.from_dict(a.get("fidelity")), resume=True, device=device or saved.get("device"),
        progress=False, workers=1)


def _tracking_uri(given: str | None, saved: dict[str, Any]) -> str | None:
    given = given or os.environ.get(TRACKING_ENV) or None
    if given:
        return given
    recorded = saved.get("tracking_uri")
    if recorded and "***" in recorded:
        raise UserError(f"the study logs to MLflow at {recorded}, whose password is never stored: pass "
                        "--tracking-uri URI (or set AUTOPEFT_TRACKING_URI)")
    return recorded


def worker_command(study: str, *, storage: str | None, tracking_uri: str | None = None, out: str | None = None,
                   device: str | None = None, grace: float = DEFAULT_GRACE_S, timeout: float | None = None) -> None:
    """`autopeft worker --study NAME --storage URL`: one clear line and exit 2 for bad input (cli.py)."""
    url = storage or os.environ.get(STORAGE_ENV)
    if not url:
        raise UserError("autopeft worker needs --storage URL (or AUTOPEFT_STORAGE), the study's shared storage")
    from autopeft.search import check_timeout

    check_timeout(timeout)
    run_worker(study, url, tracking_uri, out=out, device=device, grace=grace, timeout=timeout,
               echo=lambda line: print(line, flush=True))


def run_worker(study_name: str, storage_url: str, tracking_uri: str | None = None, *, out: str | None = None,
               device: str | None = None, grace: float = DEFAULT_GRACE_S, timeout: float | None = None,
               echo: Callable[[str], None] = print) -> WorkStats:
    """`autopeft worker`: join a study on a shared storage and train its trials until the budget is done, or
    until `timeout` seconds have passed (no trial starts after that; a running one finishes)."""
    from autopeft.search import mask_url, objective, pack_objective, pack_planner, prepare

    study = load_study_or_explain(study_name, storage_url)
    opts = options_from_study(study, storage_url, tracking_uri=tracking_uri, out=out, device=device)
    prepared = prepare(opts)  # validates data/backbone/space here; loads (never creates) the study
    study = prepared.study
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tag = f"worker {os.getpid()}"
    complete, running = counts(study)
    echo(f"{tag}: study {study_name!r} on {mask_url(storage_url)}: {complete}/{budget_of(study)} complete, "
         f"{running} running")
    tracker = _tracker(opts, study, echo)

    def after(study: optuna.Study, trial: FrozenTrial) -> None:
        if tracker is not None and trial.state != TrialState.PRUNED:
            tracker.log_trial(study, trial, trial.user_attrs.get("loss_curve"))
        echo(f"{tag}: {describe(study, trial)}")

    planner = pack_planner(prepared)
    stop = Stop(grace).install()
    started = time.time()
    try:
        stats = work(study, _objective_with_tracking(objective(prepared), tracker), stop=stop, after=after, echo=echo,
                     pack=pack_with_tracking(pack_objective(prepared, planner), tracker),
                     pack_size=planner.size if planner else int(opts.pack_size),
                     distributions=prepared.distributions,
                     deadline=None if timeout is None else started + timeout)
    finally:
        stop.uninstall()
    complete, _ = counts(study)
    why = ("stopped by signal" if stop.requested.is_set() else "budget done" if complete >= budget_of(study)
           else "timeout")
    echo(f"{tag}: {why}; ran {stats.complete} complete, {stats.failed} failed in {time.time() - started:.0f}s; "
         f"study {complete}/{budget_of(study)} complete")
    return stats


def _tracker(opts: Any, study: optuna.Study, echo: Callable[[str], None]) -> Any:
    """The study's MLflow tracker (search.py's `start_tracking`), or None; tracking never costs a trial."""
    try:
        from autopeft.search import start_tracking
    except ImportError:
        return None
    try:
        return start_tracking(opts, study, echo)
    except Exception as exc:  # tracking never costs a trial
        echo(f"autopeft: warning: MLflow tracking disabled: {type(exc).__name__}")
        return None


def _objective_with_tracking(fn: Callable[[optuna.Trial], Any], tracker: Any) -> Callable[[optuna.Trial], Any]:
    if tracker is None:
        return fn

    def run(trial: optuna.Trial) -> Any:
        tracker.begin_trial(trial)
        return fn(trial)

    return run


def pack_with_tracking(fn: Callable[[list[optuna.Trial]], list[Any]], tracker: Any
                       ) -> Callable[[list[optuna.Trial]], list[Any]]:
    """Each trial of a pack gets its (RUNNING) MLflow child run before the pack trains."""

    def run(trials: list[optuna.Trial]) -> list[Any]:
        if tracker is not None:
            for trial in trials:
                tracker.begin_trial(trial)
        return fn(trials)

    return run


def describe(study: optuna.Study, trial: FrozenTrial) -> str:
    a = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        return (f"trial {trial.number:3d}  {a.get('metric_name', 'metric')} {a.get('metric', float('nan')):.4f}  "
                f"params {a.get('trainable_params', 0):,}  mem {a.get('peak_memory_mb', 0):.1f} MiB  "
                f"{a.get('spec_summary', '')}")
    return f"trial {trial.number:3d}  {trial.state.name} ({fail_reason(study, trial) or 'error'})"


# ----- `autopeft search --workers N` -------------------------------------------------------------------------------
def worker_envs(n: int, device: str | None) -> list[dict[str, str]]:
    """One environment per worker: a GPU each (CUDA_VISIBLE_DEVICES, round robin) on CUDA, else CPU workers."""
    import torch

    base = dict(os.environ)
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not cuda:
        return [{**base, "CUDA_VISIBLE_DEVICES": ""} for _ in range(n)]
    gpus = visible_gpus()
    return [{**base, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (all of the machine's when it is unset,
    none without CUDA): what worker processes are spread over, one each in turn."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def spawn_workers(opts: Any, storage_url: str, n: int, *, echo: Callable[[str], None] = print,
                  grace: float = DEFAULT_GRACE_S) -> list[int]:
    """Start `n` `autopeft worker` processes on this machine, stream their lines with a prefix, wait for all.

    Ctrl-C (SIGINT) or SIGTERM here is forwarded as SIGTERM, so each worker finishes or fails its trial cleanly.
    Returns the workers' exit codes.
    """
    cmd = [sys.executable, "-m", "autopeft", "worker", "--study", opts.study_name, "--out", str(opts.out),
           "--grace", str(grace)]
    device = opts.device
    if device and device.startswith("cuda"):
        device = "cuda"  # each worker sees only its own GPU, as cuda:0
    if device:
        cmd += ["--device", device]
    if opts.timeout is not None:  # `autopeft search --timeout` holds for its workers too
        cmd += ["--timeout", str(opts.timeout)]
    procs: list[subprocess.Popen] = []
    lock = threading.Lock()

    def pump(i: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with lock:
                echo(f"[w{i}] {line.rstrip()}")

    for env in worker_envs(n, opts.device):
        env[STORAGE_ENV] = storage_url
        if opts.tracking_uri:
            env[TRACKING_ENV] = opts.tracking_uri
        env.setdefault("PYTHONUNBUFFERED", "1")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    pumps = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()

    def forward(signum: int, frame: Any) -> None:
        echo("autopeft: stopping workers (each finishes or fails its trial)")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for t in pumps:
        t.join(timeout=5)
    return codes
