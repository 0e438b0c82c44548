"""MLflow tracking: the study mirrored as parent/child runs, the front tagged, outages survived.

The fast tests drive `Tracker` with a hand-made study; the slow one starts a real `mlflow server` on
127.0.0.1, runs a tiny search against it and checks MLflow against Optuna's own `study.best_trials`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from autopeft.spec import PeftSpec
from autopeft.tracking import ERROR_ATTR, RUN_ID_ATTR, TAG_PARETO, TAG_STATE, TAG_STUDY, TAG_TRIAL, Tracker

DIRECTIONS = ["maximize", "minimize", "minimize"]


def fill(study: optuna.Study, tracker: Tracker | None, n: int, *, fail: int | None = None, seed: int = 0) -> None:
    """`n` trials with measurements as search.py records them; trial `fail` ends FAILED with a reason."""
    rng = random.Random(seed)
    for i in range(n):
        t = study.ask()
        if tracker:
            tracker.begin_trial(t)
        rank = rng.choice([2, 4, 8])
        spec = PeftSpec.from_dict({"lora": {"rank": {"q": rank}}}, num_layers=2)
        t.set_user_attr("spec", spec.to_dict())
        t.set_user_attr("spec_summary", spec.summary())
        if i == fail:
            t.set_user_attr("autopeft.fail_reason", "out of memory")
            frozen = study.tell(t, state=TrialState.FAIL)
        else:
            acc, params, mem = rng.random(), 1000 * rank + rng.randint(0, 99), rng.uniform(100, 200)
            attrs = {"metric": acc, "dev_metric": acc, "metric_name": "accuracy", "trainable_params": params,
                     "trainable_pct": params / 1e4, "peak_memory_mb": mem, "train_seconds": 1.5,
                     "tokens_per_s": 321.0, "loss_curve": [1.0, 0.7, 0.5], "steps": 3, "constraints": []}
            for key, value in attrs.items():
                t.set_user_attr(key, value)
            frozen = study.tell(t, [acc, params, mem])
        if tracker:
            tracker.log_trial(study, study.trials[frozen.number])


def new_study(out: Path, name: str = "hand") -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=DIRECTIONS, study_name=name, storage=f"sqlite:///{out}/optuna.db")
    for key, value in {"task": "glue/sst2", "backbone": "tiny", "space": "lora",
                       "objectives": ["metric", "params", "memory"], "fidelity": {"max_steps": 3}}.items():
        study.set_user_attr(key, value)
    return study


def children(client: Any, tracker: Tracker) -> dict[int, Any]:
    runs = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'")
    return {int(r.data.tags[TAG_TRIAL]): r for r in runs}


def check_mirror(client: Any, study: optuna.Study, tracker: Tracker) -> None:
    """MLflow shows exactly the study: one child run per finished trial, the front tagged as Optuna's."""
    runs = children(client, tracker)
    finished = {t.number: t for t in study.trials if t.state.is_finished()}
    assert set(runs) == set(finished)
    front = {t.number for t in study.best_trials}
    assert front and {n for n, r in runs.items() if r.data.tags[TAG_PARETO] == "true"} == front
    for number, run in runs.items():
        t = finished[number]
        tags, metrics = run.data.tags, run.data.metrics
        assert tags[TAG_STUDY] == study.study_name
        assert t.user_attrs.get(RUN_ID_ATTR, run.info.run_id) == run.info.run_id
        if t.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and tags[TAG_STATE] == "COMPLETE"
            for key, attr in (("metric", "metric"), ("trainable_params", "trainable_params"),
                              ("trainable_pct", "trainable_pct"), ("peak_memory_mb", "peak_memory_mb"),
                              ("train_seconds", "train_seconds"), ("tokens_per_s", "tokens_per_s")):
                assert metrics[key] == pytest.approx(float(t.user_attrs[attr])), key
            history = client.get_metric_history(run.info.run_id, "loss")
            assert len(history) == len(t.user_attrs["loss_curve"])  # the loss curve as a step metric
            assert run.data.params["methods"] != "" and "backbone" in run.data.params
        else:
            assert run.info.status == "FAILED"
            assert tags[TAG_STATE].startswith("FAILED: ") and t.user_attrs["autopeft.fail_reason"] in tags[TAG_STATE]


def test_tracker_mirrors_study_and_moves_pareto_tags(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    study = new_study(tmp_path)
    tracker = Tracker(None, tmp_path, None, "hand", png=False, echo=lambda _: None)
    tracker.start(study)
    fill(study, tracker, 4, fail=1)
    client = MlflowClient(tracker.tracking_uri)
    check_mirror(client, study, tracker)
    # a dominating trial arrives: every old front member loses its tag, in MLflow as in Optuna
    t = study.ask()
    for key, value in {"metric": 1.0, "trainable_params": 1, "peak_memory_mb": 1.0, "metric_name": "accuracy"}.items():
        t.set_user_attr(key, value)
    frozen = study.tell(t, [1.0, 1, 1.0])
    tracker.log_trial(study, study.trials[frozen.number])
    assert [t.number for t in study.best_trials] == [frozen.number]
    runs = children(client, tracker)
    assert {n for n, r in runs.items() if r.data.tags[TAG_PARETO] == "true"} == {frozen.number}
    # a dominated trial leaves the front as it is (tags and table are only rewritten when the front moves)
    t = study.ask()
    for key, value in {"metric": 0.1, "trainable_params": 9, "peak_memory_mb": 9.0, "metric_name": "accuracy"}.items():
        t.set_user_attr(key, value)
    dominated = study.tell(t, [0.1, 9, 9.0])
    tracker.log_trial(study, study.trials[dominated.number])
    runs = children(client, tracker)
    assert runs[dominated.number].data.tags[TAG_PARETO] == "false"
    assert {n for n, r in runs.items() if r.data.tags[TAG_PARETO] == "true"} == {frozen.number}
    table = json.loads(Path(client.download_artifacts(tracker.parent_run_id, "pareto/front_table.json",
                                                      str(tmp_path / "table"))).read_text())
    assert [row[table["columns"].index("trial")] for row in table["data"]] == [frozen.number]
    tracker.finish(study)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and json.loads(parent.data.tags["autopeft.front"]) == [frozen.number]
    assert study.user_attrs["mlflow_parent_run_id"] == tracker.parent_run_id
    files = {f.path for f in client.list_artifacts(tracker.parent_run_id, "pareto")}
    assert {"pareto/report.html", "pareto/front.json", "pareto/front_table.json"} <= files
    front_json = json.loads(Path(client.download_artifacts(tracker.parent_run_id, "pareto/front.json",
                                                           str(tmp_path))).read_text())
    assert [r["trial"] for r in front_json] == [frozen.number]
    assert front_json[0]["export_command"].startswith("autopeft export --study hand")


def test_unreachable_store_costs_no_trial_and_catches_up(tmp_path: Path) -> None:
    """A dead tracking server: the study goes on, the failure is recorded, a later start logs the missing trials."""
    from autopeft.ui import free_port

    study = new_study(tmp_path)
    warnings: list[str] = []
    dead = Tracker(f"http://127.0.0.1:{free_port()}", tmp_path, None, "hand", retries=2, backoff=0.01, png=False,
                   echo=warnings.append)
    dead.start(study)
    fill(study, dead, 3)
    dead.finish(study)
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 3
    assert study.user_attrs[ERROR_ATTR]["error"] and study.user_attrs["mlflow_unlogged"] == [0, 1, 2]
    assert any("tracking failed" in w for w in warnings)
    # the embedded store is reachable: starting syncs every finished trial, each exactly once
    from mlflow import MlflowClient

    live = Tracker(None, tmp_path, None, "hand", png=False, echo=lambda _: None)
    live.start(study)
    live.finish(study)
    check_mirror(MlflowClient(live.tracking_uri), study, live)
    assert live.unlogged(study) == []


def test_ui_without_a_store_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from autopeft.cli import main

    assert main(["ui", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no MLflow store" in err and "\n" not in err
    assert main(["ui", "--out", str(tmp_path), "--tracking-uri", "sqlite:///x.db"]) == 2


# ----- end to end: a real MLflow server and a real (tiny) search -----------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from autopeft.ui import start_server, stop_server

    root = tmp_path_factory.mktemp("mlflow-server")
    with open(root / "server.log", "wb") as log:
        proc, url = start_server(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", 0, log, root / "server.log")
        try:
            yield url
        finally:
            stop_server(proc)


@pytest.mark.slow
def test_search_against_real_mlflow_server(tmp_path: Path, tiny_backbone_dir: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    from autopeft.search import run_search
    from tests.test_search import options

    opts = options(tmp_path, tiny_backbone_dir, toy_data(tmp_path), tracking_uri=mlflow_server, experiment="e2e",
                   n_trials=4)
    study = run_search(opts, echo=lambda _: None)
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("e2e")
    parents = client.search_runs([exp.experiment_id], "tags.`autopeft.role` = 'study'")
    assert [p.info.run_id for p in parents] == [study.user_attrs["mlflow_parent_run_id"]]
    tracker = Tracker.for_search(opts)
    tracker.experiment_id, tracker.parent_run_id = exp.experiment_id, parents[0].info.run_id
    check_mirror(client, study, tracker)
    for t in study.trials:  # either side finds the other
        run = client.get_run(t.user_attrs[RUN_ID_ATTR])
        assert run.data.tags[TAG_TRIAL] == str(t.number) and run.data.tags["autopeft.optuna_study"] == study.study_name
        assert run.data.params["backbone"] == str(tiny_backbone_dir)
    files = {f.path for f in client.list_artifacts(parents[0].info.run_id, "pareto")}
    assert {"pareto/report.html", "pareto/front.json", "pareto/front.png", "pareto/front_table.json"} <= files
    front = json.loads(Path(client.download_artifacts(parents[0].info.run_id, "pareto/front.json",
                                                      str(tmp_path))).read_text())
    assert sorted(r["trial"] for r in front) == sorted(t.number for t in study.best_trials)
    assert ERROR_ATTR not in study.user_attrs


def toy_data(root: Path) -> Any:
    """The toy sentiment CSVs of test_search, written under `root`."""
    from autopeft.train import DataOptions
    from tests.test_train import write_sentiment_csv

    d = root / "toy"
    d.mkdir()
    return DataOptions(train_file=str(write_sentiment_csv(d / "train.csv", 240, 0)),
                       dev_file=str(write_sentiment_csv(d / "dev.csv", 60, 1)), text_column="review",
                       label_column="label")
