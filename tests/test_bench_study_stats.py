"""bench/study_stats.py: a finished study's trials grouped by the layers they adapt (README's issue-9 figures)."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_trials_are_grouped_by_adapted_layers_with_the_samplers_share(tmp_path: Path) -> None:
    from study_stats import stats

    db = tmp_path / "optuna.db"
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{db}", directions=["maximize", "minimize"])
    study.set_user_attr("search_options", {"n_startup_trials": 2})
    dist = {"x": optuna.distributions.IntDistribution(0, 9)}
    one = {"num_layers": 3, "lora": {"rank": {"q": [0, 8, 0]}}}
    two = {"num_layers": 3, "lora": {"rank": {"q": [8, 0, 0]}}, "bitfit": [False, False, True]}
    for i, (spec, acc, dev) in enumerate([(two, 0.80, 0.70), (one, 0.70, 0.60), (one, 0.74, 0.64),
                                          (one, 0.90, None), (two, 0.86, 0.80)]):
        study.add_trial(optuna.trial.create_trial(params={"x": i}, distributions=dist, values=[acc, 1e4],
                                                  user_attrs={"spec": spec, "dev_metric": dev}))
    study.add_trial(optuna.trial.create_trial(params={"x": 9}, distributions=dist,
                                              state=optuna.trial.TrialState.FAIL, user_attrs={"spec": two}))
    by = stats(str(db), "s")["by_adapted_layers"]
    # bench/data keeps the larger databases gzipped: read as they are
    import gzip
    import shutil

    with db.open("rb") as src, gzip.open(tmp_path / "optuna.db.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert stats(str(tmp_path / "optuna.db.gz"), "s")["by_adapted_layers"] == by
    assert by == {"1": {"complete": 3, "chosen_by_sampler": 2, "median_heldout": 0.74, "median_dev": 0.62},
                  "2": {"complete": 2, "chosen_by_sampler": 1, "median_heldout": pytest.approx(0.83),
                        "median_dev": pytest.approx(0.75)}}


def test_a_missing_file_or_study_is_one_line_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    import gzip
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "study_stats.py"
    db = tmp_path / "optuna.db"
    optuna.create_study(study_name="s", storage=f"sqlite:///{db}")
    gz = tmp_path / "optuna.db.gz"
    gz.write_bytes(gzip.compress(db.read_bytes()))
    for path, study, says in ((tmp_path / "none.db.gz", "s", "no such file"),
                              (db, "t", f"{db} holds no study named 't'"), (gz, "t", f"{gz} holds no study named")):
        done = subprocess.run([sys.executable, str(script), str(path), "--study", study, "--device", "h200",
                               "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and says in done.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "out").exists() and not (tmp_path / "none.db.gz").exists()


def test_stand_ins_are_not_counted_and_trials_within_the_limits_are(tmp_path: Path) -> None:
    """A refused or OOM trial's COMPLETE stand-in (autopeft.worker.record_infeasible) was never trained; a study
    under --max-params is judged by its trained trials that meet the limit."""
    from study_stats import stats

    db = tmp_path / "optuna.db"
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{db}", directions=["maximize"])
    dist = {"x": optuna.distributions.IntDistribution(0, 9)}
    spec = {"num_layers": 1, "bitfit": [True]}
    for i, (attrs, state) in enumerate([({"spec": spec, "constraints": [-0.2]}, "COMPLETE"),
                                        ({"spec": spec, "constraints": [0.5]}, "COMPLETE"),
                                        ({"spec": spec, "autopeft.fail_reason": "over_max_params"}, "FAIL"),
                                        ({"autopeft.shadow_of": 2, "constraints": [0.7]}, "COMPLETE")]):
        study.add_trial(optuna.trial.create_trial(params={"x": i}, distributions=dist, user_attrs=attrs,
                                                  state=optuna.trial.TrialState[state],
                                                  values=[0.8] if state == "COMPLETE" else None))
    row = stats(str(db), "s")
    assert row["trials"] == {"complete": 2, "fail": 1}
    assert row["complete_within_limits"] == 1 and row["infeasible_stand_ins"] == 1
    assert row["fail_reasons"] == {"over_max_params": 1}
