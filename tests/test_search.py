"""`autopeft search` on a tiny real backbone: a study that finishes, resumes, survives a kill, rejects bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopeft.cli import main
from autopeft.errors import TrialFailed, UserError
from autopeft.search import SearchOptions, parse_max_params, run_search
from autopeft.spec import Fidelity
from autopeft.train import DataOptions
from tests.test_train import toy_options

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> DataOptions:
    return toy_options(tmp_path_factory.mktemp("search-toy"), 240, 60)


def options(tmp_path: Path, backbone: Path, data: DataOptions, **kw: object) -> SearchOptions:
    base = {"task": "file", "out": str(tmp_path / "runs"), "backbone": str(backbone), "data": data, "space": "mixed",
            "n_trials": 4, "n_startup_trials": 2, "sampler": "random", "seed": 0, "heldout_examples": 40,
            "fidelity": Fidelity(train_examples=None, max_steps=3, batch_size=8, max_length=32), "progress": False}
    return SearchOptions(**{**base, **kw})


def test_study_completes_scores_honestly_and_keeps_weights(tmp_path: Path, tiny_backbone_dir: Path,
                                                           toy: DataOptions) -> None:
    opts = options(tmp_path, tiny_backbone_dir, toy)
    study = run_search(opts, echo=lambda _: None)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    assert (tmp_path / "runs" / "optuna.db").is_file()
    assert study.user_attrs["selection"]["split"] == "heldout-from-train"
    for t in done:
        assert t.user_attrs["dev_metric"] is not None  # dev measured beside the held-out score
        assert t.values[0] == t.user_attrs["metric"]
        assert Path(t.user_attrs["weights_path"]).is_file()
        assert t.user_attrs["spec"]["num_layers"] == 2


def test_packed_study_trains_packs_and_tells_each_trial(tmp_path: Path, tiny_backbone_dir: Path,
                                                        toy: DataOptions) -> None:
    """--pack-size 3 with BoTorch: the start points train three at a time, then one GP fit proposes a whole
    pack (its q-batch); every trial is told its own values, and what a packed trial records is what the same
    configuration gets trained alone (same seeds and data: the packing equivalence, end to end)."""
    from autopeft.sampler import BATCH_ATTR
    from autopeft.search import PACK_ATTR, prepare
    from autopeft.train import run_trial

    opts = options(tmp_path, tiny_backbone_dir, toy, n_trials=6, n_startup_trials=3, sampler="botorch",
                   pack_size=3)
    study = run_search(opts, echo=lambda _: None)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6 and not study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    packs = {t.number: t.user_attrs[PACK_ATTR] for t in done if PACK_ATTR in t.user_attrs}
    assert [p["first"] for p in packs.values()] == [0, 0, 0, 3, 3, 3] and {p["size"] for p in packs.values()} == {3}
    assert [t.user_attrs.get(BATCH_ATTR) for t in done[3:]] == [None, 3, 3]  # one BoTorch fit for the 2nd pack
    assert len({json.dumps(t.user_attrs["spec"], sort_keys=True) for t in done}) == 6
    prepared = prepare(options(tmp_path / "other", tiny_backbone_dir, toy))
    alone = run_trial(prepared.trial_config(done[4].user_attrs["spec"]), task=prepared.task_data, select="heldout",
                      heldout_fraction=40 / len(prepared.task_data.train), device="cpu", progress=False)
    assert alone.metrics.metric == pytest.approx(done[4].user_attrs["metric"], abs=1e-6)
    assert alone.metrics.train_loss == pytest.approx(done[4].user_attrs["train_loss"], rel=1e-4)


def test_resume_continues_without_rerunning(tmp_path: Path, tiny_backbone_dir: Path, toy: DataOptions) -> None:
    opts = options(tmp_path, tiny_backbone_dir, toy, n_trials=2)
    first = run_search(opts, echo=lambda _: None)
    numbers = [t.number for t in first.trials]
    with pytest.raises(UserError, match="--resume"):
        run_search(opts, echo=lambda _: None)
    again = run_search(options(tmp_path, tiny_backbone_dir, toy, n_trials=3, resume=True), echo=lambda _: None)
    complete = [t for t in again.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and [t.number for t in complete][:2] == numbers[:2]
    with pytest.raises(UserError, match="another search space"):
        run_search(options(tmp_path, tiny_backbone_dir, toy, n_trials=4, resume=True, space="lora"),
                   echo=lambda _: None)


def _heartbeat_trial_ids(db: Path) -> set[int]:
    import sqlite3

    con = sqlite3.connect(db, timeout=1.0)
    try:
        return {row[0] for row in con.execute("SELECT trial_id FROM trial_heartbeats")}
    finally:
        con.close()


def test_sigkill_mid_trial_then_resume(tmp_path: Path, tiny_backbone_dir: Path, toy: DataOptions) -> None:
    """A study killed mid-trial resumes; the half-run trial ends FAILED and is retried; nothing done is lost."""
    out = tmp_path / "runs"
    args = ["search", "--task", "file", "--out", str(out), "--backbone", str(tiny_backbone_dir), "--space", "mixed",
            "--sampler", "random", "--n-trials", "3", "--train", toy.train_file, "--dev", toy.dev_file,
            "--text-column", "review", "--label-column", "label", "--heldout-examples", "40", "--batch-size", "8",
            "--max-length", "32"]
    # one quick complete trial first, then a run whose next trial trains long enough (many epochs) to be caught
    # mid-trial: waiting for "one complete and the next running" inside a single run raced a loaded CI machine
    assert main([*args, "--n-trials", "1", "--max-steps", "3", "--no-tracking"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "autopeft", *args, "--resume", "--epochs", "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"sqlite:///{out / 'optuna.db'}"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # until the second trial is running, heartbeat on
        try:
            running_ids = [t._trial_id for t in optuna.load_study(study_name="file", storage=url).trials
                           if t.state == optuna.trial.TrialState.RUNNING]
            beating = _heartbeat_trial_ids(out / "optuna.db")
        except Exception:  # the database may be locked for a moment by the search's own writes
            running_ids, beating = [], set()
        # killed before its first heartbeat, a trial is never failed as stale (Optuna fails only trials with one):
        # the likely cause of this test's one failure, in a full run on 2026-11-30 (it passed alone after)
        if any(i in beating for i in running_ids):
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the resumed study never had a running trial: {proc.communicate()[0][-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = optuna.load_study(study_name="file", storage=url)
    done_before = {t.number: t.values for t in before.trials if t.state == optuna.trial.TrialState.COMPLETE}
    running = [t.number for t in before.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert running, "the killed trial should still look RUNNING until its heartbeat goes stale"
    time.sleep(31)  # grace period of the heartbeat
    assert main([*args, "--resume", "--epochs", "40", "--max-steps", "3"]) == 0
    after = optuna.load_study(study_name="file", storage=url)
    states = {t.number: t.state for t in after.trials}
    assert all(states[n] == optuna.trial.TrialState.FAIL for n in running)
    for n, values in done_before.items():
        assert after.trials[n].values == values  # completed trials untouched, not re-run
    complete = [t for t in after.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    retried = [t for t in after.trials if t.system_attrs.get("failed_trial") in running]
    assert retried and retried[0].params == after.trials[running[0]].params


@pytest.mark.slow
def test_pack_size_auto_plans_each_pack_and_workers_inherit_it(tmp_path: Path, tiny_backbone_dir: Path,
                                                                toy: DataOptions, capsys) -> None:
    """`--pack-size auto` through the CLI: the packed loop asks the planner before each pack (on a CPU it plans
    one trial: packing shares nothing a CPU could use), the summary line lists the sizes, and a worker joining
    the study rebuilds `auto` from the study's saved options."""
    from autopeft.search import PACK_ATTR
    from autopeft.worker import options_from_study

    out = tmp_path / "runs"
    code = main(["search", "--task", "file", "--out", str(out), "--backbone", str(tiny_backbone_dir),
                 "--train", toy.train_file, "--dev", toy.dev_file, "--text-column", "review", "--label-column",
                 "label", "--n-trials", "3", "--sampler", "random", "--pack-size", "auto", "--device", "cpu",
                 "--no-tracking", "--max-steps", "2", "--heldout-examples", "40"])
    printed = capsys.readouterr().out
    assert code == 0 and "3 trials complete" in printed and "(packs sized by memory: 1, 1, 1)" in printed, printed
    study = optuna.load_study(study_name="file", storage=f"sqlite:///{out / 'optuna.db'}")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 3 and all(t.user_attrs[PACK_ATTR]["size"] == 1 for t in done)
    assert options_from_study(study, f"sqlite:///{out / 'optuna.db'}").pack_size == "auto"


def test_front_command_json(tmp_path: Path, tiny_backbone_dir: Path, toy: DataOptions, capsys) -> None:
    run_search(options(tmp_path, tiny_backbone_dir, toy, n_trials=3), echo=lambda _: None)
    assert main(["front", "--study", "file", "--out", str(tmp_path / "runs"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {"trial", "metric", "dev_metric", "params", "params_pct", "memory_mb", "spec"} <= set(rows[0])
    assert main(["front", "--study", "nope", "--out", str(tmp_path / "runs")]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "needle"), [
    (["--space", "nonexistent-space"], "space"),
    (["--storage", "postgresql://u:secret@127.0.0.1:1/db"], "cannot open storage"),
    (["--max-params", "10"], "cannot be met"),
    (["--max-params", "lots"], "--max-params"),
    (["--n-trials", "0"], "--n-trials"),
    (["--pack-size", "0"], "--pack-size"),
    (["--pack-size", "lots"], "--pack-size must be a positive integer or auto"),
    (["--proposal-batch", "0"], "--proposal-batch"),
    (["--timeout", "-5"], "--timeout"),
    (["--n-startup-trials", "-1"], "--n-startup-trials"),
    (["--objectives", "metric,flops"], "unknown objective"),
    (["--objectives", "params,memory"], "unknown objective"),
    (["--cuda-graphs", "on", "--device", "cpu"], "--cuda-graphs on needs a CUDA device"),
])
def test_bad_search_input_exit_2_nothing_created(flags: list[str], needle: str, tmp_path: Path,
                                                 tiny_backbone_dir: Path, toy: DataOptions, capsys) -> None:
    out = tmp_path / "runs"
    code = main(["search", "--task", "file", "--out", str(out), "--backbone", str(tiny_backbone_dir),
                 "--train", toy.train_file, "--dev", toy.dev_file, "--text-column", "review",
                 "--label-column", "label", *flags])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert "secret" not in err
    assert not (out / "optuna.db").exists()


def test_objectives_and_startup_flags_override_the_preset(tmp_path: Path, tiny_backbone_dir: Path,
                                                         toy: DataOptions) -> None:
    """Every preset field has a flag (the fidelity's too): a two-objective study (accuracy vs. params, memory
    left out) is made with exactly the objectives, start and fidelity the flags ask for, and records them."""
    out = tmp_path / "runs"
    assert main(["search", "--task", "file", "--out", str(out), "--backbone", str(tiny_backbone_dir),
                 "--train", toy.train_file, "--dev", toy.dev_file, "--text-column", "review",
                 "--label-column", "label", "--objectives", "metric,params", "--n-startup-trials", "1",
                 "--sampler", "random", "--n-trials", "2", "--max-steps", "2", "--eval-batch-size", "16",
                 "--no-tracking"]) == 0
    study = optuna.load_study(study_name="file", storage=f"sqlite:///{out / 'optuna.db'}")
    assert study.user_attrs["objectives"] == ["metric", "params"]
    assert study.user_attrs["fidelity"]["eval_batch_size"] == 16
    assert [len(t.values) for t in study.trials] == [2, 2]
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]


def test_max_params_forms() -> None:
    assert parse_max_params("0.5%", 1_000_000) == 5000
    assert parse_max_params("1234", 10) == 1234
    with pytest.raises(UserError):
        parse_max_params("-3", 10)


def test_a_repeated_configuration_reuses_its_twin(tmp_path: Path, tiny_backbone_dir: Path, toy: DataOptions,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampler may propose a config twice; the second trial reuses the first's measurements, untrained."""
    import random

    from autopeft import search

    prepared = search.prepare(options(tmp_path, tiny_backbone_dir, toy, n_startup_trials=0))
    params = prepared.space.random_params(random.Random(3), prepared.num_layers)
    prepared.study.enqueue_trial(params)
    prepared.study.enqueue_trial(params)
    calls = []
    real = search.run_trial
    monkeypatch.setattr(search, "run_trial", lambda *a, **k: calls.append(1) or real(*a, **k))
    prepared.study.optimize(search.objective(prepared), n_trials=2)
    first, second = prepared.study.trials[:2]
    assert len(calls) == 1 and second.user_attrs[search.DUPLICATE_OF] == first.number
    assert second.values == first.values and second.user_attrs["weights_path"] == first.user_attrs["weights_path"]
    waiting = prepared.study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1  # a new configuration is queued so the search does not stall on the repeat
    queued = waiting[0].system_attrs["fixed_params"]
    assert prepared.space.decode(queued, prepared.num_layers).to_dict() != first.user_attrs["spec"]


@pytest.mark.parametrize("where", ["sqlite", "memory"])
def test_set_user_attrs_writes_all_at_once_like_set_user_attr(where: str, tmp_path: Path) -> None:
    from autopeft.search import set_user_attrs

    storage = f"sqlite:///{tmp_path / 'a.db'}" if where == "sqlite" else None
    study = optuna.create_study(storage=storage, study_name="a")
    trial = study.ask()
    attrs = {"metric": 0.5, "loss_curve": [0.7, 0.6], "extra": {"k": 1}, "spec": {"lora": {"rank": {"q": 4}}}}
    set_user_attrs(trial, attrs)
    assert trial.user_attrs == attrs  # the trial object sees them at once, as after set_user_attr
    study.tell(trial, 1.0)
    again = optuna.load_study(study_name="a", storage=storage) if storage else study
    assert again.trials[0].user_attrs == attrs
    with pytest.raises(RuntimeError):  # a finished trial refuses, as set_user_attr does
        set_user_attrs(trial, {"late": 1})


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([5_000, 16_898, 60_000, 227_000]))
def test_random_points_under_a_tight_budget_fit_and_vary(seed: int, budget: int) -> None:
    """--max-params: the random start (and the fresh point after a repeat or a refusal) are configurations the
    user accepts, each once, and not the head alone, which teaches the sampler nothing: under IA3's 17k params
    at MiniLM size, redrawing until a uniform draw fit had given eight head-only start points."""
    from autopeft.peft import ModelDims, peft_param_count
    from autopeft.search import sample_configs, spec_key
    from autopeft.space import SearchSpace

    space = SearchSpace.load("mixed")
    dims = ModelDims("bert", 6, 384, 1536, 12, 12, 32)

    def fits(spec: object) -> bool:
        return peft_param_count(spec, dims) + 770 <= budget

    points = sample_configs(space, 6, random.Random(seed), 8, tries=400, fits=fits)
    specs = [space.decode(p, 6) for p in points]
    assert len(points) == 8 and all(fits(s) for s in specs)
    assert len({spec_key(s.to_dict()) for s in specs}) == 8
    assert sum(peft_param_count(s, dims) == 0 for s in specs) <= 1
    dists = space.distributions(6)
    assert all(dists[k]._contains(v) for p in points for k, v in p.items())  # still points of the space


def test_a_proposal_over_max_params_is_refused_untrained(tmp_path: Path, tiny_backbone_dir: Path,
                                                         toy: DataOptions, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its size is known before training: no time is spent on it, the sampler is told it is infeasible (a
    COMPLETE stand-in with its true constraint), it does not count toward --n-trials, and a fresh point that
    fits is queued for the next trial."""
    from autopeft import search
    from autopeft.worker import FAIL_REASON

    probe = search.prepare(options(tmp_path / "probe", tiny_backbone_dir, toy, n_startup_trials=0))
    dists = probe.distributions
    biggest = {k: d.high if hasattr(d, "high") else d.choices[-1] for k, d in dists.items()}
    big = probe.params_of(probe.space.decode(biggest, probe.num_layers))
    limit = probe.head_params + (big - probe.head_params) // 20
    prepared = search.prepare(options(tmp_path, tiny_backbone_dir, toy, n_startup_trials=0, max_params=str(limit)))
    prepared.study.enqueue_trial(biggest)
    calls = []
    real = search.run_trial
    monkeypatch.setattr(search, "run_trial", lambda *a, **k: calls.append(1) or real(*a, **k))
    prepared.study.optimize(search.objective(prepared), n_trials=2, catch=(TrialFailed,))
    refused, shadow, fresh = (prepared.study.trials[i] for i in (0, 1, 2))
    assert refused.state == optuna.trial.TrialState.FAIL and refused.user_attrs[FAIL_REASON] == "over_max_params"
    assert shadow.state == optuna.trial.TrialState.COMPLETE and shadow.user_attrs[search.SHADOW_ATTR] == 0
    assert shadow.system_attrs["constraints"][0] == pytest.approx(math.log10(big / limit))
    assert fresh.state == optuna.trial.TrialState.COMPLETE and len(calls) == 1  # only the fresh point trained
    assert fresh.user_attrs["trainable_params"] <= limit
    assert fresh.user_attrs["constraints"][0] == pytest.approx(math.log10(fresh.user_attrs["trainable_params"] / limit))
    assert search.completed(prepared.study) == 1


def test_a_pack_trains_its_trials_within_max_params_and_refuses_the_other(tmp_path: Path, tiny_backbone_dir: Path,
                                                                          toy: DataOptions) -> None:
    """In a pack (`--pack-size`), the proposal over the limit is refused before the pack trains, and the
    others train as if it had never been asked."""
    import random

    from autopeft import search
    from autopeft.worker import FAIL_REASON

    probe = search.prepare(options(tmp_path / "probe", tiny_backbone_dir, toy, n_startup_trials=0))
    biggest = {k: d.high if hasattr(d, "high") else d.choices[-1] for k, d in probe.distributions.items()}
    big = probe.params_of(probe.space.decode(biggest, probe.num_layers))
    limit = probe.head_params + (big - probe.head_params) // 20
    prepared = search.prepare(options(tmp_path, tiny_backbone_dir, toy, n_startup_trials=0, max_params=str(limit),
                                      pack_size=3))
    small = search.sample_configs(prepared.space, prepared.num_layers, random.Random(1), 2, tries=100,
                                  fits=lambda spec: prepared.params_of(spec) <= limit)
    for params in (small[0], biggest, small[1]):
        prepared.study.enqueue_trial(params)
    trials = [prepared.study.ask() for _ in range(3)]
    outcomes = search.pack_objective(prepared)(trials)
    assert isinstance(outcomes[1], TrialFailed) and outcomes[1].reason == "over_max_params"
    assert trials[1].user_attrs[FAIL_REASON] == "over_max_params"
    assert all(isinstance(o, list) for o in (outcomes[0], outcomes[2]))
    assert trials[0].user_attrs[search.PACK_ATTR]["size"] == 2  # the refused one never joined the pack
    assert all(t.user_attrs["trainable_params"] <= limit for t in (trials[0], trials[2]))


def test_a_resumed_older_study_keeps_its_linear_params_constraint(tmp_path: Path, tiny_backbone_dir: Path,
                                                                  toy: DataOptions) -> None:
    """Studies made before the constraint went to decades recorded params - limit; resumed, they go on so, and
    one study's constraint values never mix two scales. A new study records the scale it uses."""
    from autopeft import search

    opts = options(tmp_path, tiny_backbone_dir, toy, n_startup_trials=0, max_params="5000")
    new = search.prepare(opts)
    assert new.params_scale == "log10" and new.study.user_attrs[search.PARAMS_SCALE_ATTR] == "log10"
    assert new.params_violation(50_000) == pytest.approx(1.0)
    # an older study: the same attributes but that one
    (tmp_path / "old").mkdir()
    older = optuna.create_study(study_name=new.study.study_name, storage=f"sqlite:///{tmp_path / 'old' / 'optuna.db'}",
                                directions=new.study.directions)
    for key, value in new.study.user_attrs.items():
        if key != search.PARAMS_SCALE_ATTR:
            older.set_user_attr(key, value)
    old = search.prepare(dataclasses.replace(opts, out=str(tmp_path / "old"), resume=True))
    assert old.params_scale == "linear" and old.params_violation(6000) == 1000.0
