"""`autopeft ui` in a real browser: headless Chromium opens the MLflow UI on a tiny study's embedded store,
finds the study's runs, opens the Pareto report artifact, and the report itself renders and links a trial.

Screenshots go to `test-artifacts/ui-browser/` (or `$AUTOPEFT_TEST_ARTIFACTS/ui-browser/`) for a person to look
at; the assertions read the page's DOM after its scripts ran, not just an HTTP status.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO

pytestmark = pytest.mark.slow

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
ARTIFACTS = Path(os.environ.get("AUTOPEFT_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui-browser"
ML = "workflowType=machine_learning"  # MLflow 3's UI opens on its GenAI view unless told otherwise

if CHROMIUM is None:
    pytest.skip("chromium not installed (Debian: apt-get install chromium; `make test` installs it where it can)",
                allow_module_level=True)


def chromium(url: str, *, screenshot: Path | None = None, budget_ms: int = 30000,
             expect: Sequence[str] = ()) -> str:
    """The DOM after the page's scripts ran (and a screenshot beside). Site isolation is off so the screenshot
    includes MLflow's sandboxed report iframe.

    `--virtual-time-budget` ends when the page's virtual clock runs out, not when MLflow's API calls have
    answered; on a loaded 2-core machine (CI, or a test run beside other work) the server can answer after the
    dump. So when the DOM lacks any of `expect`, the page is loaded again (up to 3 times): a page that never
    shows them still fails the caller's assertion."""
    base = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1400,1000", "--disable-site-isolation-trials",
            "--disable-features=IsolateOrigins,site-per-process", f"--virtual-time-budget={budget_ms}",
            "--hide-scrollbars"]
    for _ in range(3):
        done = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True)
        if all(e in done.stdout for e in expect):
            break
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
        assert screenshot.stat().st_size > 10_000  # a real picture, not a blank page
    return done.stdout


@pytest.fixture(scope="module")
def study_out(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> tuple[Path, object]:
    """A tiny search with the default embedded tracking store under --out."""
    from autopeft.search import run_search
    from tests.test_search import options
    from tests.test_tracking import toy_data

    root = tmp_path_factory.mktemp("ui-browser")
    opts = options(root, tiny_backbone_dir, toy_data(root), study="ui-demo", n_trials=3)
    study = run_search(opts, echo=lambda _: None)
    return Path(opts.out), study


@pytest.fixture(scope="module")
def ui(study_out: tuple[Path, object]) -> Iterator[str]:
    """`autopeft ui --out DIR` as a user starts it; its first line is the URL."""
    from autopeft.ui import free_port

    out, _ = study_out
    proc = subprocess.Popen([sys.executable, "-m", "autopeft", "ui", "--out", str(out), "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()  # printed once the server answers /health
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, f"autopeft ui printed no URL: {line!r}"
        yield match.group(0)
    finally:
        proc.send_signal(signal.SIGTERM)  # ui stops its MLflow server (a process group) and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_mlflow_ui_shows_runs_and_pareto_report(ui: str, study_out: tuple[Path, object]) -> None:
    from mlflow import MlflowClient

    from autopeft.tracking import default_tracking_uri

    out, study = study_out
    client = MlflowClient(default_tracking_uri(out))
    exp = client.get_experiment_by_name("autopeft/file")
    parent = study.user_attrs["mlflow_parent_run_id"]

    runs_dom = chromium(f"{ui}/#/experiments/{exp.experiment_id}/runs?{ML}", screenshot=ARTIFACTS / "runs.png",
                        expect=["ui-demo"])
    assert "ui-demo" in runs_dom  # the study's parent run, by name, in the runs table

    page = f"{ui}/#/experiments/{exp.experiment_id}/runs/{parent}/artifacts/pareto/report.html?{ML}"
    run_dom = chromium(page, screenshot=ARTIFACTS / "run-report.png", budget_ms=60000,
                       expect=["pareto/report.html", "mlflow-html-iframe"])
    assert "pareto/report.html" in run_dom and "mlflow-html-iframe" in run_dom  # MLflow shows the HTML artifact

    # the report as MLflow serves it, opened in the browser with one front trial linked (#trial=N)
    html = requests.get(f"{ui}/get-artifact", params={"path": "pareto/report.html", "run_uuid": parent}, timeout=60)
    assert html.ok
    local = ARTIFACTS / "report.html"
    local.write_bytes(html.content)
    front = sorted(t.number for t in study.best_trials)
    report_dom = chromium(f"{local.as_uri()}#trial={front[0]}", screenshot=ARTIFACTS / "report.png")
    assert "main-svg" in report_dom  # plotly drew the chart
    assert f"Pareto front ({len(front)})" in report_dom  # every front trial highlighted, as Optuna has it
    picked = re.search(r'<div id="picked">(.*?)</pre>', report_dom, re.S)
    assert picked and f"autopeft export --study ui-demo --out {out.resolve()} --trial {front[0]}" in picked.group(1)
    rows = re.findall(r"<tr data-trial=\"(\d+)\"", report_dom)
    assert sorted(map(int, rows)) == front

