"""Workers on a shared PostgreSQL study (a real server, started by the `postgres` fixture): bad input, OOM and NaN
trials, SIGTERM, `search --workers`, and a chaos run where a worker is SIGKILLed twice mid-trial."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autopeft.cli import main
from autopeft.search import SearchOptions, prepare, run_search
from autopeft.spec import Fidelity
from autopeft.train import DataOptions
from autopeft.worker import FAIL_REASON, RETRY_OF, SHADOW_ATTR, WORKER_ATTR, fail_reason
from tests.postgres import free_port
from tests.test_train import toy_options

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> DataOptions:
    return toy_options(tmp_path_factory.mktemp("worker-toy"), 120, 30)


def options(tmp_path: Path, backbone: Path, data: DataOptions, url: str, **kw: object) -> SearchOptions:
    base = {"task": "file", "study": "s", "out": str(tmp_path / "runs"), "storage": url, "backbone": str(backbone),
            "data": data, "space": "mixed", "n_trials": 4, "n_startup_trials": 2, "sampler": "random", "seed": 0,
            "heldout_examples": 20, "fidelity": Fidelity(train_examples=None, max_steps=2, batch_size=8, max_length=24),
            "progress": False, "tracking": False}
    return SearchOptions(**{**base, **kw})


def worker_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "AUTOPEFT_HEARTBEAT_S": "1", "AUTOPEFT_GRACE_S": "4",
            "PYTHONUNBUFFERED": "1", **extra}


def one_line_exit_2(capsys, argv: list[str], needle: str, secret: str | None = None) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    if secret:
        assert secret not in err, err
    return err


# ----- bad input -------------------------------------------------------------------------------------------------
def test_worker_unreachable_and_wrong_password_exit_2_masked(postgres, capsys) -> None:
    unreachable = f"postgresql+psycopg2://autopeft:topsecret1@127.0.0.1:{free_port()}/autopeft"
    err = one_line_exit_2(capsys, ["worker", "--study", "s", "--storage", unreachable], "cannot open storage",
                          "topsecret1")
    assert "***" in err
    wrong = postgres.url_with(password="wrongsecret2")
    one_line_exit_2(capsys, ["worker", "--study", "s", "--storage", wrong], "cannot open storage", "wrongsecret2")


def test_worker_unknown_study_lists_studies(postgres_url: str, capsys) -> None:
    from autopeft.search import open_storage

    optuna.create_study(study_name="present", storage=open_storage(postgres_url))
    password = postgres_url.split(":")[2].split("@")[0]
    err = one_line_exit_2(capsys, ["worker", "--study", "nope", "--storage", postgres_url], "no study named 'nope'",
                          password)
    assert "present" in err


def test_same_study_name_other_space_exit_2(postgres_url: str, tmp_path: Path, tiny_backbone_dir: Path,
                                            toy: DataOptions, capsys) -> None:
    prepare(options(tmp_path, tiny_backbone_dir, toy, postgres_url))  # study 's' with the mixed space
    password = postgres_url.split(":")[2].split("@")[0]
    base = ["search", "--task", "file", "--study", "s", "--storage", postgres_url, "--backbone",
            str(tiny_backbone_dir), "--train", toy.train_file, "--dev", toy.dev_file, "--text-column", "review",
            "--label-column", "label", "--space", "lora", "--no-tracking"]
    one_line_exit_2(capsys, base, "another search space", password)
    one_line_exit_2(capsys, [*base, "--resume"], "another search space", password)


def test_storage_password_never_stored(postgres_url: str, tmp_path: Path, tiny_backbone_dir: Path,
                                       toy: DataOptions) -> None:
    password = postgres_url.split(":")[2].split("@")[0]
    prepared = prepare(options(tmp_path, tiny_backbone_dir, toy, postgres_url,
                               tracking_uri=f"http://me:{password}@127.0.0.1:1"))
    assert password not in repr(prepared.study.user_attrs)


# ----- OOM and NaN -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_oom_and_nan_trials_fail_with_reasons_study_goes_on(postgres_url: str, tmp_path: Path,
                                                            tiny_backbone_dir: Path, toy: DataOptions,
                                                            monkeypatch) -> None:
    monkeypatch.setenv("AUTOPEFT_INJECT_FAULT", "oom@0,nan@1")  # a simulated allocator failure; a NaN loss
    opts = options(tmp_path, tiny_backbone_dir, toy, postgres_url, n_trials=3, max_params="100000000")
    study = run_search(opts, echo=lambda _: None)
    trials = {t.number: t for t in study.trials}
    oom, nan = trials[0], trials[1]
    assert oom.state == TrialState.FAIL and oom.user_attrs[FAIL_REASON] == "oom"
    assert "simulated" in oom.user_attrs["autopeft.fail_detail"]
    assert isinstance(oom.user_attrs["peak_memory_mb"], float)  # memory recorded up to the failure
    assert nan.state == TrialState.FAIL and nan.user_attrs[FAIL_REASON] == "nan"
    # the OOM configuration reaches the sampler as an infeasible COMPLETE stand-in with the same params
    shadows = [t for t in study.trials if SHADOW_ATTR in t.user_attrs]
    assert len(shadows) == 1 and shadows[0].user_attrs[SHADOW_ATTR] == 0 and shadows[0].params == oom.params
    assert shadows[0].state == TrialState.COMPLETE and all(c > 0 for c in shadows[0].system_attrs["constraints"])
    real = [t for t in study.trials if t.state == TrialState.COMPLETE and SHADOW_ATTR not in t.user_attrs]
    assert len(real) == 3  # the study went on and met its budget; the stand-in does not count
    from autopeft.pareto import front_trials

    assert all(SHADOW_ATTR not in t.user_attrs for t in front_trials(study))


# ----- SIGTERM -----------------------------------------------------------------------------------------------------
def _wait(pred, timeout: float, what: str, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    for p in procs:
        p.kill()
    logs = "\n".join((p.communicate()[0] or "")[-3000:] for p in procs)
    pytest.fail(f"timed out waiting for {what}\n{logs}")


def _trials(url: str, name: str = "s") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def _running_on(url: str, pid: int, name: str = "s") -> bool:
    return any(t.state == TrialState.RUNNING and t.user_attrs.get(WORKER_ATTR, "").endswith(f":{pid}")
               for t in _trials(url, name))


@pytest.mark.slow
def test_sigterm_fails_the_trial_cleanly_and_requeues_it(postgres_url: str, tmp_path: Path,
                                                        tiny_backbone_dir: Path, toy: DataOptions) -> None:
    opts = options(tmp_path, tiny_backbone_dir, toy, postgres_url, n_trials=2,
                   fidelity=Fidelity(train_examples=None, max_steps=100000, batch_size=8, max_length=24))
    prepare(opts)
    proc = subprocess.Popen([sys.executable, "-m", "autopeft", "worker", "--study", "s", "--grace", "1"],
                            env=worker_env(AUTOPEFT_STORAGE=postgres_url), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait(lambda: _running_on(postgres_url, proc.pid), 120, "a running trial", [proc])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert postgres_url.split(":")[2].split("@")[0] not in out  # the password never reaches a log line
    trials = _trials(postgres_url)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs[FAIL_REASON] == "sigterm", out
    retry = [t for t in trials if t.user_attrs.get(RETRY_OF) == failed[0].number]
    assert retry and retry[0].state == TrialState.WAITING and retry[0].params == failed[0].params
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def _search_args(study: str, tmp_path: Path, backbone: Path, toy: DataOptions, *extra: str) -> list[str]:
    """`autopeft search` with two local CPU workers on the toy task, random sampler, 2-step trials."""
    return ["search", "--task", "file", "--study", study, "--out", str(tmp_path / "runs"), "--backbone", str(backbone),
            "--train", toy.train_file, "--dev", toy.dev_file, "--text-column", "review", "--label-column", "label",
            "--sampler", "random", "--max-steps", "2", "--batch-size", "8", "--max-length", "24",
            "--heldout-examples", "20", "--workers", "2", "--no-tracking", "--device", "cpu", *extra]


@pytest.mark.slow
def test_search_workers_share_one_global_budget(postgres_url: str, tmp_path: Path, tiny_backbone_dir: Path,
                                                toy: DataOptions, capsys) -> None:
    args = _search_args("w", tmp_path, tiny_backbone_dir, toy, "--storage", postgres_url, "--space", "mixed",
                        "--n-trials", "5")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[w0]" in out and "[w1]" in out
    assert postgres_url.split(":")[2].split("@")[0] not in out
    complete = [t for t in _trials(postgres_url, "w") if t.state == TrialState.COMPLETE]
    assert len(complete) == 5
    assert len({t.user_attrs[WORKER_ATTR] for t in complete}) == 2  # both workers trained


def test_search_timeout_holds_for_its_workers(tmp_path: Path, tiny_backbone_dir: Path, toy: DataOptions,
                                              capsys) -> None:
    """`search --workers N --timeout T` must stop the workers starting trials after T, as without --workers
    (they once ignored it: a 400 s search ran for 570 s)."""
    args = _search_args("t", tmp_path, tiny_backbone_dir, toy, "--n-trials", "50", "--timeout", "0")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("timeout; ran 0 complete, 0 failed") == 2, out
    started = [t for t in _trials(f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}", "t") if t.state != TrialState.WAITING]
    assert started == []


# ----- chaos -------------------------------------------------------------------------------------------------------
N_CHAOS = 30


@pytest.fixture(scope="module")
def chaos(postgres, tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path, toy: DataOptions) -> dict:
    """30 trials, 3 workers on PostgreSQL (study and MLflow store both on it); a worker SIGKILLed mid-trial, twice
    (whichever is mid-trial when looked at: trials are fast, so waiting for one particular worker can miss)."""
    tmp = tmp_path_factory.mktemp("chaos")
    url = postgres.create_database("chaos")
    tracking = postgres.create_database("chaos_mlflow")
    opts = options(tmp, tiny_backbone_dir, toy, url, study="chaos", n_trials=N_CHAOS, n_startup_trials=3,
                   tracking=True, tracking_uri=tracking)
    prepare(opts)
    cmd = [sys.executable, "-m", "autopeft", "worker", "--study", "chaos", "--device", "cpu"]
    env = worker_env(AUTOPEFT_STORAGE=url, AUTOPEFT_TRACKING_URI=tracking)
    spawn = lambda: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = [spawn() for _ in range(3)]
    killed: list[int] = []
    started = time.time()
    found: list[int] = []

    def one_mid_trial() -> bool:  # any live worker with a RUNNING trial (trials take ~1 s: poll, then act)
        found[:] = [i for i, p in enumerate(procs) if p.poll() is None and _running_on(url, p.pid, "chaos")][:1]
        return bool(found)

    for _ in range(8):  # until two kills landed mid-trial: a trial can end between the look and the kill
        if len(killed) == 2:
            break
        _wait(one_mid_trial, 180, "a worker mid-trial", procs)
        victim = procs[found[0]]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        if _running_on(url, victim.pid, "chaos"):  # its trial stays RUNNING until the heartbeat goes stale
            killed.append(victim.pid)
        procs[found[0]] = spawn()
    assert len(killed) == 2, "could not catch a worker mid-trial twice in 8 kills"
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(30, 300 - (time.time() - started)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("chaos workers did not finish in time")
    return {"url": url, "tracking": tracking, "killed": killed, "codes": [p.returncode for p in procs],
            "outs": outs, "opts": opts}


@pytest.mark.slow
def test_chaos_study_completes_exactly_once_per_trial(chaos: dict) -> None:
    assert chaos["codes"] == [0, 0, 0], "\n".join(o[-2000:] for o in chaos["outs"])
    study = optuna.load_study(study_name="chaos", storage=chaos["url"])
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    complete = [t for t in trials if t.state == TrialState.COMPLETE and SHADOW_ATTR not in t.user_attrs]
    assert len(complete) == N_CHAOS
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    killed = [t for t in trials if t.state == TrialState.FAIL
              and any(t.user_attrs.get(WORKER_ATTR, "").endswith(f":{pid}") for pid in chaos["killed"])]
    assert len(killed) == 2 and all(fail_reason(study, t) == "heartbeat" for t in killed)
    for t in killed:  # each was re-queued with its reason
        assert any(r.user_attrs.get(RETRY_OF) == t.number for r in trials)


@pytest.mark.slow
def test_chaos_every_complete_trial_has_one_finished_mlflow_run(chaos: dict) -> None:
    from mlflow import MlflowClient

    study = optuna.load_study(study_name="chaos", storage=chaos["url"])
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE and SHADOW_ATTR not in t.user_attrs]
    client = MlflowClient(tracking_uri=chaos["tracking"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=1000)]
    by_trial: dict[str, list] = {}
    for r in runs:
        number = r.data.tags.get("autopeft.trial_number")
        if number is not None:
            by_trial.setdefault(str(number), []).append(r)
    password = chaos["url"].split(":")[2].split("@")[0]
    for t in complete:
        got = [r for r in by_trial.get(str(t.number), []) if r.info.status == "FINISHED"]
        assert len(got) == 1, (t.number, [r.info.status for r in by_trial.get(str(t.number), [])])
        metrics = got[0].data.metrics
        assert any(abs(v - t.values[0]) < 1e-9 for v in metrics.values()), (t.number, metrics, t.values)
        assert password not in repr(got[0].data.params) + repr(got[0].data.tags)


def test_options_roundtrip_from_study(postgres_url: str, tmp_path: Path, tiny_backbone_dir: Path,
                                      toy: DataOptions) -> None:
    from autopeft.worker import options_from_study

    opts = options(tmp_path, tiny_backbone_dir, toy, postgres_url, max_params="12345", max_memory=999.0)
    study = prepare(opts).study
    back = options_from_study(study, postgres_url)
    for f in ("task", "backbone", "space", "data", "n_trials", "sampler", "fidelity", "max_memory", "objectives",
              "heldout_examples", "tracking", "n_startup_trials"):
        assert getattr(back, f) == getattr(opts, f), f
    assert back.max_params == "12345" and back.resume
    assert dataclasses.replace(back, seed=opts.seed).seed == opts.seed


def _random_study(tmp_path: Path, n_trials: int) -> optuna.Study:
    """A random-sampler study on SQLite (heartbeats work there) with a budget of `n_trials`, for the packing loop."""
    from autopeft.search import open_storage

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"), study_name="p",
                                direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("n_trials", n_trials)
    return study


def test_work_in_packs_tells_each_trial_its_outcome_within_the_budget(tmp_path: Path) -> None:
    """The packing loop on its own (a stand-in pack, SQLite with heartbeats): trials are asked K at a time but
    never past the budget, params are sampled when asked, and each trial is told its own outcome."""
    from optuna.distributions import IntDistribution

    from autopeft.errors import TrialFailed
    from autopeft.worker import work

    study = _random_study(tmp_path, n_trials=7)
    packs: list[list[int]] = []

    def pack(trials: list[optuna.Trial]) -> list:
        packs.append([t.number for t in trials])
        return [TrialFailed("nan", "loss became nan") if t.number == 4 else [float(t.params["x"])] for t in trials]

    stats = work(study, lambda t: 0.0, pack=pack, pack_size=3, distributions={"x": IntDistribution(0, 99)},
                 echo=lambda _: None)
    assert packs == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert (stats.complete, stats.failed) == (7, 1)
    trials = study.get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 7
    assert trials[4].state == TrialState.FAIL and trials[4].user_attrs[FAIL_REASON] == "nan"
    assert all(t.values == [float(t.params["x"])] for t in trials if t.state == TrialState.COMPLETE)
    assert all(t.user_attrs[WORKER_ATTR].endswith(f":{os.getpid()}") for t in trials)


def test_a_planned_pack_size_is_asked_before_each_pack(tmp_path: Path) -> None:
    """`--pack-size auto`: `work` asks the planner before every pack, even when it plans one trial, and never
    asks past the budget."""
    from optuna.distributions import IntDistribution

    from autopeft.worker import work

    study = _random_study(tmp_path, n_trials=9)
    plans = iter([4, 1, 2, 8])
    packs: list[list[int]] = []

    def pack(trials: list[optuna.Trial]) -> list:
        packs.append([t.number for t in trials])
        return [[float(t.params["x"])] for t in trials]

    work(study, lambda t: 0.0, pack=pack, pack_size=lambda: next(plans), distributions={"x": IntDistribution(0, 9)},
         echo=lambda _: None)
    assert packs == [[0, 1, 2, 3], [4], [5, 6], [7, 8]]


def test_a_pack_leaves_nothing_behind_for_the_next(tmp_path: Path) -> None:
    """What a pack built in reference cycles (models, optimisers, graphs: GPU memory) is collected before the next
    pack starts, not whenever the collector runs."""
    import gc
    import weakref

    from optuna.distributions import IntDistribution

    from autopeft.worker import work

    study = _random_study(tmp_path, n_trials=6)
    left: list[weakref.ref] = []
    alive_at_start: list[bool] = []

    class Model:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    def pack(trials: list[optuna.Trial]) -> list:
        alive_at_start.append(any(r() is not None for r in left))
        left.append(weakref.ref(Model()))
        return [[float(t.params["x"])] for t in trials]

    gc.disable()  # no automatic collection: only the loop's own
    try:
        work(study, lambda t: 0.0, pack=pack, pack_size=2, distributions={"x": IntDistribution(0, 9)},
             echo=lambda _: None)
    finally:
        gc.enable()
    assert alive_at_start == [False, False, False]
