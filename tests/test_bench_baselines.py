"""bench/baselines.py: which front points get retrained, and the rescoring that ranks them (issue "evidence")."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import optuna
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture()
def storage(tmp_path: Path) -> str:
    """A finished 3-objective study whose front is trials 0-2 under 1% of params and trial 3 above it."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize", "minimize", "minimize"])
    dist = {"x": optuna.distributions.IntDistribution(0, 9)}
    for i, (acc, params, mem, pct) in enumerate([(0.90, 3e4, 300, 0.1), (0.89, 2e4, 280, 0.09),
                                                  (0.88, 1e4, 260, 0.05), (0.91, 5e5, 400, 2.2)]):
        study.add_trial(optuna.trial.create_trial(
            params={"x": i}, distributions=dist, values=[acc, params, mem],
            user_attrs={"spec": {"lora": {"rank": {"q": i + 1}}}, "trainable_pct": pct,
                        "trainable_params": int(params)}))
    return url


def test_front_points_under_the_budget_come_first_by_held_out(storage: str) -> None:
    from baselines import front_specs

    assert [n for n, _ in front_specs(storage, "s", 2, 1.0)] == ["autopeft_trial0", "autopeft_trial1"]
    # a baseline with 15k params: the best front point within that budget is added
    assert [n for n, _ in front_specs(storage, "s", 1, 1.0, {"hf_x": 15_000})] == ["autopeft_trial0",
                                                                                   "autopeft_trial2"]


def test_rescoring_reorders_what_is_retrained(storage: str) -> None:
    """A front point lucky in the study's one run loses its place once reruns at the same fidelity are averaged
    in; a failed rerun counts for nothing."""
    from baselines import front_specs, rescore_candidates, rescored_means

    candidates = rescore_candidates(storage, "s", 3, 1.0)
    assert [n for n, _, _ in candidates] == [0, 1, 2]  # trial 3 is over 1%: never rescored
    runs = [{"trial": 0, "heldout_metric": 0.86}, {"trial": 0, "heldout_metric": 0.87},
            {"trial": 1, "heldout_metric": 0.90}, {"trial": 1, "error": "RuntimeError: boom"},
            {"trial": 2, "heldout_metric": 0.88}]
    ranking = rescored_means(candidates, runs)
    assert ranking == pytest.approx({0: (0.90 + 0.86 + 0.87) / 3, 1: (0.89 + 0.90) / 2, 2: 0.88})
    assert [n for n, _ in front_specs(storage, "s", 2, 1.0, ranking=ranking)] == ["autopeft_trial1",
                                                                                  "autopeft_trial2"]


def test_reuse_takes_only_baseline_rows(tmp_path: Path) -> None:
    """--reuse fills the table with an earlier file's baselines, never its front points or rescoring runs."""
    from baselines import reused_rows

    rows = [{"name": "hf_ia3", "seed": 0, "metric": 0.85}, {"name": "autopeft_trial8", "seed": 0, "metric": 0.88},
            {"name": "rescore_trial8", "seed": 1, "trial": 8, "heldout_metric": 0.9}, {"name": "means", "means": {}}]
    path = tmp_path / "baselines-x.json"
    path.write_text(json.dumps({"rows": rows}))
    assert [r["name"] for r in reused_rows(str(path))] == ["hf_ia3"]


def test_pool_processes_take_the_visible_gpus_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--jobs N` on a machine of several GPUs spreads the runs over all of them, not N on the first."""
    import multiprocessing as mp

    from baselines import _pin_gpu

    from autopeft.worker import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    counter = mp.get_context("spawn").Value("i", 0)
    seen = []
    for _ in range(3):
        _pin_gpu(counter, ["2", "3"])
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["2", "3", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    _pin_gpu(counter, ["5"])  # one GPU: left as it is
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


def test_a_configuration_the_study_ran_twice_is_retrained_once(storage: str) -> None:
    from baselines import front_specs, rescore_candidates

    study = optuna.load_study(study_name="s", storage=storage)
    twin = study.trials[1]  # the same spec again, equal on every objective: a second front point
    study.add_trial(optuna.trial.create_trial(params={"x": 9}, distributions=twin.distributions,
                                              values=twin.values, user_attrs=twin.user_attrs))
    assert [n for n, _, _ in rescore_candidates(storage, "s", 5, 1.0)] == [0, 1, 2]
    assert [n for n, _ in front_specs(storage, "s", 5, 1.0)] == [f"autopeft_trial{i}" for i in (0, 1, 2, 3)]


def test_a_single_objective_study_ranks_all_its_feasible_trials(tmp_path: Path) -> None:
    """`--objectives metric --max-params 1%` has a front of one trial; rescoring wants its best few."""
    from baselines import rescore_candidates

    url = f"sqlite:///{tmp_path / 'one.db'}"
    study = optuna.create_study(study_name="one", storage=url, direction="maximize")
    dist = {"x": optuna.distributions.IntDistribution(0, 9)}
    for i, (acc, feasible) in enumerate([(0.88, True), (0.91, False), (0.90, True), (0.87, True)]):
        study.add_trial(optuna.trial.create_trial(
            params={"x": i}, distributions=dist, values=[acc],
            user_attrs={"spec": {"lora": {"rank": {"q": i + 1}}}, "trainable_pct": 0.5,
                        "constraints": [-1.0 if feasible else 5.0]},
            system_attrs={"constraints": [-1.0 if feasible else 5.0]}))
    assert [n for n, _, _ in rescore_candidates(url, "one", 2, 1.0)] == [2, 0]


def test_several_studies_go_into_one_table_without_name_clashes(storage: str) -> None:
    """`--study A B` (e.g. a study per parameter budget): both fronts are retrained, each row names its study,
    and one study's reruns never enter the other's ranking, though their trial numbers are the same."""
    from baselines import front_specs, rescored_means

    assert [n for n, _ in front_specs(storage, "s", 1, 1.0, label="s")] == ["autopeft_s_trial0"]
    candidates = [(0, {}, 0.90), (1, {}, 0.89)]
    runs = [{"study": "a", "trial": 0, "heldout_metric": 0.80}, {"study": "b", "trial": 0, "heldout_metric": 0.98},
            {"study": "a", "trial": 1, "heldout_metric": 0.89}]
    assert rescored_means(candidates, runs, "a") == pytest.approx({0: 0.85, 1: 0.89})
    assert rescored_means(candidates, runs, "b") == pytest.approx({0: 0.94, 1: 0.89})


def test_storages_must_pair_with_studies(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import baselines

    monkeypatch.setattr(sys, "argv", ["baselines.py", "--storage", "sqlite:///a.db", "sqlite:///b.db",
                                      "--study", "a", "b", "c"])
    with pytest.raises(SystemExit) as exc:
        baselines.main()
    assert exc.value.code == 2
    assert "one URL for all studies or one per --study: got 2 URLs for 3 studies" in capsys.readouterr().err


def _results(path: Path, command: str, rows: list[dict], fidelity: str = "SST-2, m, train examples all, 1 epoch(s)"
             ) -> str:
    path.write_text(json.dumps({"device": "h200", "versions": {"torch": "x"}, "command": command,
                                "notes": f"{fidelity}, seeds [0]; more", "rows": rows}))
    return str(path)


def _row(name: str, acc: float, params: int, seed: int = 0) -> dict:
    return {"name": name, "seed": seed, "metric": acc, "trainable_params": params, "trainable_pct": params / 1e5}


def test_merge_makes_one_table_of_budget_studies_run_apart(tmp_path: Path) -> None:
    """One study per parameter budget, each retrained in its own run: the summary counts a baseline dominated
    when any study's point dominates it, each baseline counts once, and trial numbers of different studies
    never merge into one row."""
    from baselines import merged_rows, summarize

    base = [_row("full_ft", 0.89, 10**7), _row("hf_ia3", 0.845, 16_898), _row("hf_lora_r8_qv", 0.867, 74_498)]
    a = _results(tmp_path / "a.json", "bench/baselines.py --study s1 s2 --jobs 16",
                 [*base, _row("autopeft_s1_trial3", 0.886, 90_000), _row("autopeft_s2_trial3", 0.850, 16_148)])
    b = _results(tmp_path / "b.json", "bench/baselines.py --storage x --study lora --front-top 6",
                 [*base, _row("autopeft_trial3", 0.875, 65_330),
                  {"name": "rescore_trial3", "trial": 3, "seed": 1, "heldout_metric": 0.9}])
    rows, first = merged_rows([a, b])
    assert first["device"] == "h200"
    names = [r["name"] for r in rows]
    assert names.count("hf_ia3") == 1 and "autopeft_lora_trial3" in names and "rescore_lora_trial3" in names
    means, summary = summarize(rows)
    assert {"autopeft_s1_trial3", "autopeft_s2_trial3", "autopeft_lora_trial3"} <= set(means)
    assert summary["hf_peft_baselines_dominated"] == 2 and summary["hf_peft_baselines_total"] == 2
    assert summary["front_gap_to_fft_points"] == pytest.approx(0.4)
    # without b's study, LoRA q,v is not dominated
    assert summarize(merged_rows([a])[0])[1]["hf_peft_baselines_dominated"] == 1


def test_merge_refuses_files_of_different_fidelities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    import baselines

    a = _results(tmp_path / "a.json", "x --study a", [_row("hf_ia3", 0.845, 16_898)])
    b = _results(tmp_path / "b.json", "x --study b", [_row("hf_ia3", 0.845, 16_898)],
                 fidelity="SST-2, m, train examples 2000, 1 epoch(s)")
    monkeypatch.setattr(sys, "argv", ["baselines.py", "--merge", a, b, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        baselines.main()
    assert exc.value.code == 2 and "different fidelities" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
