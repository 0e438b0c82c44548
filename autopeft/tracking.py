"""MLflow tracking: one parent run per study, one nested child run per trial, the Pareto front marked.

The Optuna storage is the source of truth; MLflow is a view of it that a person browses to pick a
configuration. So tracking must never cost a trial: every MLflow call is retried with backoff, and when the
tracking store stays unreachable the failure is recorded on the study (`mlflow_error`, `mlflow_unlogged`) and
the search goes on. Because the study holds everything, the tracker re-syncs: at `start` (also on
`--resume`), at the next successful `log_trial` after an outage, and at `finish`, every finished trial that
has no terminated child run is logged then. A trial therefore ends up with exactly one child run.

Either side finds the other: the trial keeps its run id as the user attribute `mlflow_run_id` (set by
`begin_trial` while the trial runs; a finished trial can no longer take attributes, so a run created later is
recorded on the study as `mlflow_run_id.<number>`), and the run carries the study name, the trial number and
the (password-masked) Optuna storage as tags.

Embedded default: `sqlite:///<out>/mlflow.db`, artifacts in `<out>/artifacts/mlflow`. Nothing is created
before `start`, which the search calls only after its inputs were validated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.trial import FrozenTrial, TrialState

from autopeft.report_page import REPORT_HTML, export_command, front_rows, points_of, write_report
from autopeft.worker import FAIL_REASON, SHADOW_ATTR

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: the parent run (reused on --resume)
RUN_ID_ATTR = "mlflow_run_id"  # trial user attr: the trial's child run
STUDY_RUN_ID_PREFIX = "mlflow_run_id."  # study user attr per trial, for runs created after the trial finished
ERROR_ATTR = "mlflow_error"  # study user attr: the last tracking failure (time, masked message)
UNLOGGED_ATTR = "mlflow_unlogged"  # study user attr: finished trials not (yet) in MLflow

TAG_STUDY = "autopeft.study"
TAG_ROLE = "autopeft.role"
TAG_TRIAL = "autopeft.trial_number"
TAG_STATE = "autopeft.state"
TAG_PARETO = "autopeft.pareto"
PNG_EVERY_S = 300.0  # front.png is redrawn at most this often during a search (see Tracker._log_report)
TAG_STORAGE = "autopeft.optuna_storage"
TAG_PARENT = "mlflow.parentRunId"
REPORT_DIR = "pareto"  # artifact folder of the parent run
TABLE_FILE = f"{REPORT_DIR}/front_table.json"
#: the MLflow UI opens an experiment of this kind on its runs table (not on the GenAI traces overview)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.FAIL: "FAILED", TrialState.PRUNED: "KILLED"}
#: per-trial measurements logged as metrics (user attr -> metric key)
TRIAL_METRICS = ("metric", "dev_metric", "trainable_params", "trainable_pct", "backbone_params", "peak_memory_mb",
                 "train_seconds", "eval_seconds", "tokens_per_s", "train_loss", "steps")

log = logging.getLogger("autopeft.tracking")


def default_tracking_uri(out_dir: str | Path) -> str:
    """The embedded store of a study's `--out`: MLflow's SQLite backend beside `optuna.db`."""
    return f"sqlite:///{(Path(out_dir) / 'mlflow.db').resolve()}"


def default_artifact_root(out_dir: str | Path) -> Path:
    return (Path(out_dir) / "artifacts" / "mlflow").resolve()


def mask_url(url: str) -> str:
    """`scheme://user:***@host/...`: a password never reaches a tag, a log line or a report."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return url


def _ms(when: datetime | None) -> int:
    return int((when.timestamp() if when else time.time()) * 1000)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's own INFO chatter (DB migrations, 'View run at ...') does not belong in a search's output."""
    names = ("mlflow", "alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service.client")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class Tracker:
    """Mirrors one Optuna study into MLflow; every public method is safe to call and never raises."""

    def __init__(self, tracking_uri: str | None, out_dir: str | Path, experiment: str | None, study_name: str, *,
                 optuna_storage: str | None = None, export_storage: str | None = None, retries: int = 3,
                 backoff: float = 0.5, report: bool = True, png: bool = True,
                 echo: Callable[[str], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.embedded = tracking_uri is None
        self.tracking_uri = tracking_uri or default_tracking_uri(out_dir)
        self.experiment_name = experiment
        self.study_name = study_name
        self.optuna_storage = mask_url(optuna_storage) if optuna_storage else None
        self.export_storage = mask_url(export_storage) if export_storage else None
        self.retries = max(1, retries)
        self.backoff = backoff
        self.report = report
        self.png = png
        self.echo = echo or (lambda line: print(line, file=sys.stderr))
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.overhead_s: list[float] = []  # seconds spent per log_trial: the cost of tracking to a search
        self._png_at = -math.inf  # when front.png was last rendered (see _log_report)
        self._final = False
        self._client: MlflowClient | None = None
        self._runs: dict[int, str] = {}  # trial number -> child run id
        self._done: set[int] = set()  # trials whose child run is terminated (all data logged)
        self._dirty = True  # a sync is due: first contact, or an earlier failure
        self._offline = False  # the last attempt failed: probe once instead of retrying every trial
        self._warned = False
        self._table_logged = False
        self._marked: set[int] | None = None  # the front as last tagged and tabled by this tracker

    # ----- construction ----------------------------------------------------------------------------------
    @classmethod
    def for_search(cls, opts: Any, **kwargs: Any) -> Tracker:
        """The tracker of `autopeft search`: `--tracking-uri` or the embedded store under `--out`."""
        out = Path(opts.out)
        storage = opts.storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
        return cls(opts.tracking_uri, out, getattr(opts, "experiment", None), opts.study_name,
                   optuna_storage=storage, export_storage=opts.storage, **kwargs)

    @property
    def masked_uri(self) -> str:
        return mask_url(self.tracking_uri)

    def export_command(self, number: int) -> str:
        out = None if self.export_storage else str(self.out_dir.resolve())
        return export_command(self.study_name, number, out=out, storage=self.export_storage)

    def report_dir(self) -> Path:
        """Where the report is also kept on disk (for the README, and for people without MLflow)."""
        return self.out_dir / "artifacts" / self.study_name / REPORT_DIR

    def client(self) -> MlflowClient:
        if self._client is None:
            if _is_http(self.tracking_uri):
                # MLflow's default is 7 retries with exponential backoff (minutes): the tracker retries itself,
                # briefly, so a dead server costs a trial seconds, not minutes. A user's own setting wins.
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            elif self.tracking_uri.startswith("sqlite:///"):
                Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            from mlflow import MlflowClient

            with _quiet_mlflow():
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # ----- public, never raising -------------------------------------------------------------------------
    def start(self, study: optuna.Study) -> None:
        """Create (or, on resume, find) the experiment and the study's parent run, then sync missing trials."""
        self._attempt(study, lambda: self._start_and_sync(study), what="start")

    def begin_trial(self, trial: optuna.Trial) -> None:
        """Open the trial's child run while it trains (it shows as RUNNING) and keep its id on the trial.

        One quick attempt only: a trial must not wait on tracking; `log_trial` creates the run if this failed.
        """
        if self.parent_run_id is None or self._offline:
            return
        try:
            with _quiet_mlflow():
                run_id = self._create_child(trial.number, trial.datetime_start, state="RUNNING")
                trial.set_user_attr(RUN_ID_ATTR, run_id)  # params come with the results, in log_trial
        except Exception as exc:  # tracking never costs a trial
            self._dirty = True
            log.debug("begin_trial %s: %s", trial.number, exc)

    def log_trial(self, study: optuna.Study, trial: FrozenTrial, loss_curve: Sequence[float] | None = None) -> None:
        """Log a finished trial as a child run, move the `autopeft.pareto` tags and re-log the report."""
        if not _tracked(trial):
            return
        started = time.perf_counter()
        self._attempt(study, lambda: self._log_trial(study, trial, loss_curve), what=f"trial {trial.number}")
        self.overhead_s.append(time.perf_counter() - started)

    def finish(self, study: optuna.Study) -> None:
        """Sync whatever is missing, mark the front, and end the parent run (FINISHED)."""
        self._dirty = True
        self._offline = False  # one full round of retries at the end, even after an outage
        self._attempt(study, lambda: self._finish(study), what="finish")
        missing = self.unlogged(study)
        if missing:
            self.echo(f"autopeft: warning: {len(missing)} trial(s) are in the study but not in MLflow "
                      f"({self.masked_uri}): {_numbers(missing)}. Nothing is lost: they are logged by the next "
                      "`autopeft search --resume` once the tracking store is reachable.")

    def unlogged(self, study: optuna.Study) -> list[int]:
        """Finished trials that have no terminated child run known to this tracker."""
        return sorted(t.number for t in study.get_trials(deepcopy=False)
                      if _tracked(t) and t.number not in self._done)

    # ----- retry / failure bookkeeping -------------------------------------------------------------------
    def _attempt(self, study: optuna.Study, fn: Callable[[], Any], *, what: str) -> bool:
        attempts = self.retries
        if self._offline:
            if not self._reachable():
                self._failed(study, ConnectionError(f"{self.masked_uri} still unreachable"), what)
                return False
            attempts = 1
        last: BaseException | None = None
        for i in range(attempts):
            try:
                with _quiet_mlflow():
                    fn()
            except Exception as exc:  # any tracking failure is recorded, never raised
                last = exc
                self._dirty = True
                if i + 1 < attempts:
                    time.sleep(self.backoff * 2**i)
                continue
            if self._offline or self._warned:
                self.echo(f"autopeft: MLflow at {self.masked_uri} is reachable again; missing trials were logged")
            self._offline = False
            self._warned = False
            self._clear_failure(study)
            return True
        assert last is not None
        self._offline = True
        self._failed(study, last, what)
        return False

    def _reachable(self) -> bool:
        """A cheap probe while offline, so an outage costs each trial milliseconds, not a round of retries."""
        if not _is_http(self.tracking_uri):
            return True
        import requests

        try:
            return requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=2).ok
        except requests.RequestException:
            return False

    def _failed(self, study: optuna.Study, exc: BaseException, what: str) -> None:
        message = mask_text(_short(exc), self.tracking_uri)
        missing = self.unlogged(study)
        if not self._warned:
            self.echo(f"autopeft: warning: MLflow tracking failed ({what}) at {self.masked_uri}: {message}. "
                      "The study goes on; missing trials are logged when the store is back.")
            self._warned = True
        try:
            study.set_user_attr(ERROR_ATTR, {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "what": what,
                                             "error": message, "tracking_uri": self.masked_uri})
            study.set_user_attr(UNLOGGED_ATTR, missing)
        except Exception as store_exc:  # the study storage has its own failure handling
            log.warning("could not record the tracking failure on the study: %s", store_exc)

    def _clear_failure(self, study: optuna.Study) -> None:
        try:
            if study.user_attrs.get(UNLOGGED_ATTR):
                study.set_user_attr(UNLOGGED_ATTR, self.unlogged(study))
        except Exception as exc:
            log.debug("could not clear %s: %s", UNLOGGED_ATTR, exc)

    # ----- the work ----------------------------------------------------------------------------------------
    def _start_and_sync(self, study: optuna.Study) -> None:
        self._start(study)
        self._sync(study, front=True)

    def _start(self, study: optuna.Study) -> None:
        client = self.client()
        attrs = study.user_attrs
        name = self.experiment_name or f"autopeft/{attrs.get('task') or self.study_name}"
        exp = client.get_experiment_by_name(name)
        if exp is None:
            # a database store without a server has no artifact root of its own: MLflow would default to
            # ./mlruns in whatever directory the worker was started from, so keep artifacts under --out
            location = None if _is_http(self.tracking_uri) else default_artifact_root(self.out_dir).as_uri()
            tags = {"autopeft.task": str(attrs.get("task", "")), **EXPERIMENT_KIND}
            try:
                self.experiment_id = client.create_experiment(name, artifact_location=location, tags=tags)
            except Exception:  # another worker created it first
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
            for key, value in EXPERIMENT_KIND.items():
                if key not in exp.tags:
                    client.set_experiment_tag(exp.experiment_id, key, value)
        self.parent_run_id = self._find_parent(study)
        if self.parent_run_id is None:
            run = client.create_run(self.experiment_id, run_name=self.study_name, tags=self._parent_tags(study))
            self.parent_run_id = run.info.run_id
            self._log_params(self.parent_run_id, self._study_params(study))
        else:
            client.update_run(self.parent_run_id, status="RUNNING")
            client.log_batch(self.parent_run_id, tags=_tags(self._parent_tags(study)))
        study.set_user_attr(PARENT_ATTR, self.parent_run_id)
        study.set_user_attr("mlflow_experiment_id", self.experiment_id)
        study.set_user_attr("mlflow_tracking_uri", self.masked_uri)
        self._dirty = True

    def _find_parent(self, study: optuna.Study) -> str | None:
        client = self.client()
        known = study.user_attrs.get(PARENT_ATTR)
        if known:
            try:
                run = client.get_run(known)
                if (run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active"
                        and run.data.tags.get(TAG_STUDY) == self.study_name):
                    return known
            except Exception as exc:  # another store (new --tracking-uri): a new parent
                log.debug("stored parent run %s not found: %s", known, exc)
        # a worker of the same study, or a study whose attr was lost: find the parent by its tags
        runs = client.search_runs([self.experiment_id], f"tags.`{TAG_STUDY}` = '{_q(self.study_name)}' and "
                                  f"tags.`{TAG_ROLE}` = 'study'", max_results=1, order_by=["attributes.start_time"])
        return runs[0].info.run_id if runs else None

    def _parent_tags(self, study: optuna.Study) -> dict[str, str]:
        attrs = study.user_attrs
        note = (f"autopeft study **{self.study_name}** ({attrs.get('task', '')}, backbone {attrs.get('backbone', '')}"
                f", space {attrs.get('space', '')}). One child run per trial; the Pareto front is tagged "
                f"`{TAG_PARETO} = true`. The Pareto report is in the artifacts: `{REPORT_DIR}/{REPORT_HTML}`.")
        tags = {TAG_STUDY: self.study_name, TAG_ROLE: "study", "autopeft.task": str(attrs.get("task", "")),
                "autopeft.objectives": ",".join(attrs.get("objectives") or []), "mlflow.note.content": note}
        if self.optuna_storage:
            tags[TAG_STORAGE] = self.optuna_storage
        return tags

    def _study_params(self, study: optuna.Study) -> dict[str, Any]:
        attrs = study.user_attrs
        params: dict[str, Any] = {k: attrs.get(k) for k in ("task", "backbone", "space", "max_params", "max_memory",
                                                             "backbone_params", "num_layers")}
        params["objectives"] = ",".join(attrs.get("objectives") or [])
        params |= {f"fidelity.{k}": v for k, v in (attrs.get("fidelity") or {}).items()}
        params |= {f"selection.{k}": v for k, v in (attrs.get("selection") or {}).items()}
        params |= {f"data.{k}": v for k, v in (attrs.get("data") or {}).items() if v not in (None, False)}
        params["directions"] = ",".join(d.name.lower() for d in study.directions)
        return params

    def _log_trial(self, study: optuna.Study, trial: FrozenTrial, loss_curve: Sequence[float] | None) -> None:
        if self.parent_run_id is None:
            self._start(study)
        front = self._front(study)
        if self._dirty:
            self._sync(study, front=False, front_numbers=front)  # logs this trial too, with the missing ones
            if trial.number not in self._done:
                self._log_child(study, trial, loss_curve, front)
        else:
            self._log_child(study, trial, loss_curve, front)
        self._mark_front(study, front)

    def _finish(self, study: optuna.Study) -> None:
        if self.parent_run_id is None:
            self._start(study)
        front = self._front(study)
        self._sync(study, front=False, front_numbers=front)
        self._final = True  # the last report always has a current front.png
        self._mark_front(study, front)
        self.client().set_terminated(self.parent_run_id, "FINISHED")

    def _front(self, study: optuna.Study) -> set[int]:
        from autopeft.pareto import front_trials

        return {t.number for t in front_trials(study)}

    def _children(self) -> list[Run]:
        """Every child run of the parent (all pages)."""
        client = self.client()
        runs: list[Run] = []
        token = None
        while True:
            page = client.search_runs([self.experiment_id], f"tags.{TAG_PARENT} = '{self.parent_run_id}'",
                                      max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _sync(self, study: optuna.Study, *, front: bool, front_numbers: set[int] | None = None) -> None:
        """Make MLflow match the study: one terminated child run per finished trial."""
        client = self.client()
        by_trial: dict[int, list[Run]] = {}
        for run in self._children():
            number = run.data.tags.get(TAG_TRIAL)
            if number is not None and number.isdigit():
                by_trial.setdefault(int(number), []).append(run)
        for number, runs in by_trial.items():
            # keep one run per trial (a terminated one first); extras come from a crash between create and log
            runs.sort(key=lambda r: (r.info.status == "RUNNING", r.info.start_time or 0))
            self._runs[number] = runs[0].info.run_id
            if runs[0].info.status != "RUNNING":
                self._done.add(number)
            for extra in runs[1:]:
                client.delete_run(extra.info.run_id)
        if front_numbers is None:
            front_numbers = self._front(study)
        for t in study.get_trials(deepcopy=False):
            if _tracked(t) and t.number not in self._done:
                self._log_child(study, t, None, front_numbers)
        self._dirty = False
        if front:
            self._mark_front(study, front_numbers)

    def _create_child(self, number: int, started: datetime | None, *, state: str) -> str:
        tags = {TAG_PARENT: self.parent_run_id, TAG_STUDY: self.study_name, TAG_TRIAL: str(number),
                TAG_STATE: state, TAG_PARETO: "false", "autopeft.optuna_study": self.study_name,
                "autopeft.export_command": self.export_command(number)}
        if self.optuna_storage:
            tags[TAG_STORAGE] = self.optuna_storage
        run = self.client().create_run(self.experiment_id, start_time=_ms(started), tags=tags,
                                       run_name=f"trial-{number}")
        self._runs[number] = run.info.run_id
        return run.info.run_id

    def _run_id_of(self, study: optuna.Study, trial: FrozenTrial) -> str | None:
        return (self._runs.get(trial.number) or trial.user_attrs.get(RUN_ID_ATTR)
                or study.user_attrs.get(f"{STUDY_RUN_ID_PREFIX}{trial.number}"))

    def _log_child(self, study: optuna.Study, trial: FrozenTrial, loss_curve: Sequence[float] | None,
                   front: set[int]) -> None:
        from mlflow.exceptions import MlflowException

        client = self.client()
        run_id = self._run_id_of(study, trial)
        if run_id is not None:
            try:
                if client.get_run(run_id).info.lifecycle_stage != "active":
                    run_id = None
            except MlflowException:  # not in this store (another --tracking-uri, or deleted): a new run
                run_id = None
        if run_id is None:
            run_id = self._create_child(trial.number, trial.datetime_start, state="RUNNING")
            if trial.user_attrs.get(RUN_ID_ATTR) != run_id:
                study.set_user_attr(f"{STUDY_RUN_ID_PREFIX}{trial.number}", run_id)
        self._runs[trial.number] = run_id
        a = trial.user_attrs
        self._log_params(run_id, self._params(a.get("spec"), trial.params, study))
        when = _ms(trial.datetime_complete)
        metrics = self._metrics(trial, loss_curve, when)
        state = RUN_STATUS.get(trial.state, "FAILED")
        # a trial failed after it ended (stale heartbeat) keeps its reason on the study, not on the trial
        reason = a.get(FAIL_REASON) or study.user_attrs.get(f"{FAIL_REASON}.{trial.number}")
        label = "COMPLETE" if trial.state == TrialState.COMPLETE else (
            f"{'FAILED' if trial.state == TrialState.FAIL else trial.state.name}: {reason or 'error'}")
        feasible = all(c <= 0 for c in a.get("constraints") or [])
        note = (f"trial {trial.number} of study **{self.study_name}**: {a.get('spec_summary', '')}\n\n"
                f"Export: `{self.export_command(trial.number)}`")
        tags = {TAG_STATE: label, TAG_PARETO: str(trial.number in front).lower(), "autopeft.feasible": str(feasible)
                .lower(), "autopeft.spec_summary": str(a.get("spec_summary", ""))[:5000], "mlflow.note.content": note}
        if reason:
            tags[FAIL_REASON] = str(reason)[:5000]
        if a.get("metric_name"):
            tags["autopeft.metric_name"] = str(a["metric_name"])
        if trial.values:
            tags["autopeft.values"] = json.dumps(trial.values)
        for i in range(0, max(1, len(metrics)), 1000):  # MLflow's batch limit: 1000 metrics
            client.log_batch(run_id, metrics=metrics[i:i + 1000], tags=_tags(tags) if i == 0 else ())
        client.set_terminated(run_id, state, end_time=when)
        self._done.add(trial.number)

    def _params(self, spec: dict | None, raw: dict[str, Any], study: optuna.Study) -> dict[str, Any]:
        """The flattened PeftSpec + fidelity + backbone: what makes the trial what it is."""
        attrs = study.user_attrs
        params: dict[str, Any] = {"backbone": attrs.get("backbone"), "task": attrs.get("task"),
                                  "space": attrs.get("space")}
        params |= {f"fidelity.{k}": v for k, v in (attrs.get("fidelity") or {}).items()}
        if spec:
            from autopeft.spec import PeftSpec

            try:
                params |= PeftSpec.from_dict(spec).flat()
            except Exception as exc:  # a spec from an older version: keep the raw params
                log.debug("spec did not parse: %s", exc)
                params |= {f"optuna.{k}": v for k, v in raw.items()}
        else:
            params |= {f"optuna.{k}": v for k, v in raw.items()}
        return params

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items() if v is not None]
        for i in range(0, len(items), 100):  # MLflow's batch limit: 100 params
            self.client().log_batch(run_id, params=items[i:i + 100])

    def _metrics(self, trial: FrozenTrial, loss_curve: Sequence[float] | None, when: int) -> list[Any]:
        from mlflow.entities import Metric

        a = trial.user_attrs
        out = []
        step = int(a.get("steps") or 0)
        for key in TRIAL_METRICS:
            value = a.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append(Metric(key, float(value), when, step))
        name = a.get("metric_name")
        if name and isinstance(a.get("metric"), (int, float)):
            out.append(Metric(str(name), float(a["metric"]), when, step))
            if isinstance(a.get("dev_metric"), (int, float)):
                out.append(Metric(f"dev_{name}", float(a["dev_metric"]), when, step))
        for key, value in (a.get("extra") or {}).items():
            if isinstance(value, (int, float)):
                out.append(Metric(f"extra.{key}", float(value), when, step))
        for i, value in enumerate(trial.values or []):
            out.append(Metric(f"objective.{i}", float(value), when, step))
        curve = loss_curve if loss_curve is not None else a.get("loss_curve")
        if curve:
            stride = int(a.get("loss_curve_stride") or 1) if loss_curve is None else 1
            out += [Metric("loss", float(v), when, i * stride) for i, v in enumerate(curve)
                    if isinstance(v, (int, float)) and math.isfinite(v)]
        return out

    def _mark_front(self, study: optuna.Study, front: set[int]) -> None:
        """Move `autopeft.pareto` to the current front, log the study's counters and the report."""
        from mlflow.entities import Metric, RunTag

        client = self.client()
        # Re-tagging and the front table cost a search and a write per front run: only when the front moved
        # since this tracker last marked it (or at the end). The child run just logged got its own tag already.
        moved = self._final or front != self._marked
        tagged = {}
        query = f"tags.{TAG_PARENT} = '{self.parent_run_id}' and tags.`{TAG_PARETO}` = 'true'"
        for run in client.search_runs([self.experiment_id], query, max_results=1000) if moved else []:
            number = run.data.tags.get(TAG_TRIAL, "")
            if number.isdigit():
                tagged[int(number)] = run.info.run_id
        for number, run_id in tagged.items():
            if number not in front:
                client.log_batch(run_id, tags=[RunTag(TAG_PARETO, "false")])
        trials = study.get_trials(deepcopy=False)
        for t in trials if moved else ():
            run_id = self._run_id_of(study, t) if t.number in front and t.number not in tagged else None
            if run_id:
                client.log_batch(run_id, tags=[RunTag(TAG_PARETO, "true")])
        finished = sum(t.state.is_finished() for t in trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        now = int(time.time() * 1000)
        metrics = [Metric("study.complete", len(complete), now, finished),
                   Metric("study.failed", finished - len(complete), now, finished),
                   Metric("study.front_size", len(front), now, finished)]
        scores = [t.user_attrs["metric"] for t in complete if isinstance(t.user_attrs.get("metric"), (int, float))]
        if scores:
            metrics.append(Metric("study.best_metric", max(scores), now, finished))
        if self.overhead_s:
            metrics.append(Metric("study.tracking_seconds", self.overhead_s[-1], now, finished))
        client.log_batch(self.parent_run_id, metrics=metrics,
                         tags=[RunTag("autopeft.front", json.dumps(sorted(front)))])
        if self.report:
            self._log_report(study, front, table=moved)
        self._marked = set(front)

    def _log_report(self, study: optuna.Study, front: set[int], table: bool = True) -> None:
        """report.html + front.png + front.json to `<out>/artifacts/<study>/pareto/` and the parent's artifacts."""
        client = self.client()
        local = self.report_dir()
        # matplotlib's PNG costs ~0.5-1 s on two busy cores, most of what tracking adds to a short CPU trial (in a
        # profiled 20-trial default study, 6 renders at one a minute took 4.8 of the 7.5 s of logging); the
        # HTML report and front.json stay current after every trial, the PNG is redrawn at most every
        # PNG_EVERY_S seconds and at the end of the search
        png = self.png and (self._final or time.monotonic() - self._png_at >= PNG_EVERY_S)
        paths = write_report(study, front, local, export=self.export_command, run_ids=dict(self._runs),
                             tracking=f"MLflow: {self.masked_uri} · parent run {self.parent_run_id}", png=png)
        if png:
            self._png_at = time.monotonic()
        for path in paths.values():
            client.log_artifact(self.parent_run_id, str(path), REPORT_DIR)
        if table:
            self._log_front_table(study, front)

    def _log_front_table(self, study: optuna.Study, front: set[int]) -> None:
        """The front as an MLflow table (`log_table`). log_table appends to an existing file, so later updates
        overwrite the file in the very format log_table writes: the table is always the current front."""
        import pandas as pd

        rows = front_rows(points_of(study, front, self.export_command, self._runs),
                          _metric_name(study))
        df = pd.DataFrame([{**{k: v for k, v in r.items() if k != "spec"}, "spec": json.dumps(r["spec"])}
                           for r in rows], columns=["trial", "metric_name", "metric", "dev_metric", "params",
                                                    "params_pct", "memory_mb", "train_seconds", "spec_summary",
                                                    "spec", "export_command", "mlflow_run_id"])
        client = self.client()
        if not self._table_logged:
            existing = {f.path for f in client.list_artifacts(self.parent_run_id, REPORT_DIR)}
            if TABLE_FILE not in existing:
                client.log_table(self.parent_run_id, data=df, artifact_file=TABLE_FILE)
                self._table_logged = True
                return
            self._table_logged = True
        with tempfile.TemporaryDirectory(prefix="autopeft-table-") as tmp:
            path = Path(tmp) / Path(TABLE_FILE).name
            df.to_json(path, orient="split", index=False, date_format="iso")
            client.log_artifact(self.parent_run_id, str(path), REPORT_DIR)


def _tracked(t: FrozenTrial) -> bool:
    """Finished trials get a run; the COMPLETE stand-in of an OOM trial (`autopeft.shadow_of`) is sampler
    bookkeeping, not a result: the OOM trial's own FAILED run already tells it."""
    return t.state.is_finished() and SHADOW_ATTR not in t.user_attrs


def _metric_name(study: optuna.Study) -> str:
    return next((t.user_attrs["metric_name"] for t in study.get_trials(deepcopy=False)
                 if "metric_name" in t.user_attrs), "metric")


def _tags(tags: dict[str, Any]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items() if v is not None]


def _q(text: str) -> str:
    """Quote a value for an MLflow filter string."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _numbers(numbers: Sequence[int]) -> str:
    shown = ", ".join(map(str, numbers[:20]))
    return shown + (f" and {len(numbers) - 20} more" if len(numbers) > 20 else "")


def mask_text(text: str, url: str) -> str:
    """An error message with the URL's password removed (requests puts the URL in its messages)."""
    password = urlsplit(url).password if "://" in url else None
    return text.replace(password, "***") if password else text

