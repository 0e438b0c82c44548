"""The Pareto report: one self-contained HTML page (Plotly), a static PNG and `front.json`, built from a study.

A person picks a configuration here, so every trial is on the page (the front highlighted, infeasible and
failed trials shown for what they are) and each point carries what is needed to act on it: its config and
the exact `autopeft export` command. The page is logged to MLflow, whose UI shows HTML artifacts in a
sandboxed iframe loaded from a blob: nothing relative can be fetched from there, so plotly.js is inlined.
The PNG is for the README and for people who never open a browser.
"""

from __future__ import annotations

import html
import json
import math
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autopeft.report import fmt_params
from autopeft.worker import FAIL_REASON, SHADOW_ATTR

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "dashboards" / "pareto_report.html"

#: the files `write_report` produces, by role
REPORT_HTML = "report.html"
FRONT_PNG = "front.png"
FRONT_JSON = "front.json"


def export_command(study_name: str, number: int, *, out: str | None = None, storage: str | None = None) -> str:
    """The exact command that turns trial `number` into an adapter directory (shell-quoted, copy-pastable)."""
    where = ["--storage", storage] if storage else ["--out", out or "autopeft-runs"]
    dest = f"./{study_name}-trial-{number}"
    return shlex.join(["autopeft", "export", "--study", study_name, *where, "--trial", str(number), dest])


@dataclass
class Point:
    """One trial as the report shows it."""

    trial: int
    state: str  # COMPLETE, FAIL, PRUNED
    metric: float | None = None
    dev_metric: float | None = None
    params: int | None = None
    params_pct: float | None = None
    memory_mb: float | None = None
    train_seconds: float | None = None
    spec_summary: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    feasible: bool = True
    on_front: bool = False
    reason: str = ""
    export_command: str = ""
    mlflow_run_id: str | None = None

    def front_row(self, metric_name: str | None) -> dict[str, Any]:
        """The keys of `autopeft front --json`, plus what a picker needs next (command, run id)."""
        return {"trial": self.trial, "metric_name": metric_name, "metric": self.metric, "dev_metric": self.dev_metric,
                "params": self.params, "params_pct": self.params_pct, "memory_mb": self.memory_mb,
                "train_seconds": self.train_seconds, "spec_summary": self.spec_summary, "spec": self.spec,
                "export_command": self.export_command, "mlflow_run_id": self.mlflow_run_id}


def _feasible(t: FrozenTrial) -> bool:
    return all(c <= 0 for c in t.user_attrs.get("constraints") or [])


def _num(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def points_of(study: optuna.Study, front: Iterable[int], export: Callable[[int], str],
              run_ids: dict[int, str] | None = None) -> list[Point]:
    """Every finished trial of the study as a `Point` (running and waiting trials are not results yet)."""
    front = set(front)
    run_ids = run_ids or {}
    points = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished() or SHADOW_ATTR in t.user_attrs:  # infeasible stand-ins are no results
            continue
        a = t.user_attrs
        points.append(Point(
            trial=t.number, state=t.state.name, metric=_num(a.get("metric")), dev_metric=_num(a.get("dev_metric")),
            params=a.get("trainable_params"), params_pct=a.get("trainable_pct"), memory_mb=a.get("peak_memory_mb"),
            train_seconds=a.get("train_seconds"), spec_summary=a.get("spec_summary", ""), spec=a.get("spec") or {},
            feasible=_feasible(t), on_front=t.number in front and t.state == TrialState.COMPLETE,
            reason=a.get(FAIL_REASON, "") if t.state != TrialState.COMPLETE else "",
            export_command=export(t.number), mlflow_run_id=run_ids.get(t.number) or a.get("mlflow_run_id")))
    return points


def front_rows(points: Sequence[Point], metric_name: str | None) -> list[dict[str, Any]]:
    """The front, fewest parameters first (the order of `autopeft front`)."""
    rows = [p.front_row(metric_name) for p in points if p.on_front]
    return sorted(rows, key=lambda r: (r["params"] or 0, -(r["metric"] or 0)))


def _plottable(p: Point) -> bool:
    return p.state == "COMPLETE" and p.metric is not None and p.params is not None


# ----- the interactive page --------------------------------------------------------------------------------
def figure_dict(points: Sequence[Point], metric_name: str) -> dict[str, Any]:
    """The Plotly figure as plain JSON: accuracy vs. trainable params (log), peak memory as colour."""
    shown = [p for p in points if _plottable(p)]
    mems = [p.memory_mb for p in shown if p.memory_mb is not None] or [0.0]
    groups = (
        ("Pareto front", [p for p in shown if p.on_front],
         {"symbol": "diamond", "size": 16, "line": {"color": "#000", "width": 2}}),
        ("other trials", [p for p in shown if not p.on_front and p.feasible],
         {"symbol": "circle", "size": 10, "opacity": 0.75, "line": {"color": "#555", "width": 0.5}}),
        ("infeasible (over a --max-* limit)", [p for p in shown if not p.feasible],
         {"symbol": "x", "size": 10, "opacity": 0.6}),
    )
    traces = []
    for name, group, marker in groups:
        traces.append({
            "type": "scatter", "mode": "markers", "name": f"{name} ({len(group)})",
            "x": [p.params for p in group], "y": [p.metric for p in group],
            "text": [f"#{p.trial}" for p in group],
            "customdata": [[p.trial, p.spec_summary, p.memory_mb, p.params_pct, p.dev_metric, p.export_command,
                            p.train_seconds] for p in group],
            "hovertemplate": ("<b>trial %{customdata[0]}</b><br>" + metric_name + " %{y:.4f}"
                              " (dev %{customdata[4]:.4f})<br>trainable params %{x:,} (%{customdata[3]:.3f}%)<br>"
                              "peak memory %{customdata[2]:.1f} MiB · train %{customdata[6]:.1f} s<br>"
                              "%{customdata[1]}<br><i>%{customdata[5]}</i><extra></extra>"),
            "marker": {**marker, "color": [p.memory_mb for p in group], "coloraxis": "coloraxis"},
        })
    return {
        "data": traces,
        "layout": {
            "xaxis": {"title": {"text": "trainable parameters (log scale)"}, "type": "log"},
            "yaxis": {"title": {"text": f"{metric_name} (held-out selection split)"}},
            "coloraxis": {"colorscale": "Viridis", "cmin": min(mems), "cmax": max(mems),
                          "colorbar": {"title": {"text": "peak memory<br>(MiB)"}}},
            "legend": {"orientation": "h", "y": -0.18},
            "margin": {"l": 70, "r": 20, "t": 20, "b": 60},
            "hoverlabel": {"align": "left"},
            "height": 560,
        },
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _front_table(rows: list[dict[str, Any]], metric_name: str) -> str:
    if not rows:
        return "<p class='empty'>No completed feasible trial yet.</p>"
    head = (f"<tr><th>trial</th><th>{html.escape(metric_name)}</th><th>dev</th><th>trainable params</th>"
            "<th>% of backbone</th><th>peak MiB</th><th>config</th><th>export</th></tr>")
    body = []
    for r in rows:
        cmd = html.escape(r["export_command"])
        body.append(
            f"<tr data-trial='{r['trial']}'><td>{r['trial']}</td><td>{_fmt(r['metric'], '.4f')}</td>"
            f"<td>{_fmt(r['dev_metric'], '.4f')}</td><td>{fmt_params(r['params'] or 0)}</td>"
            f"<td>{_fmt(r['params_pct'], '.3f')}</td><td>{_fmt(r['memory_mb'], '.0f')}</td>"
            f"<td>{html.escape(r['spec_summary'] or '')}</td><td><code class='cmd'>{cmd}</code></td></tr>")
    return f"<table id='front-table'>{head}{''.join(body)}</table>"


def _failed_table(points: Sequence[Point]) -> str:
    failed = [p for p in points if p.state != "COMPLETE"]
    if not failed:
        return "<p class='empty'>None.</p>"
    body = "".join(f"<tr><td>{p.trial}</td><td>{p.state}</td><td>{html.escape(p.reason or 'error')}</td>"
                   f"<td>{html.escape(p.spec_summary)}</td></tr>" for p in failed)
    return f"<table id='failed-table'><tr><th>trial</th><th>state</th><th>reason</th><th>config</th></tr>{body}</table>"


def _script_json(value: Any) -> str:
    """JSON safe to put inside <script>: no `</script>` or `<!--` can close or confuse the tag."""
    return json.dumps(value, allow_nan=False, default=str).replace("<", "\\u003c").replace(">", "\\u003e")


def _clean(value: Any) -> Any:
    """NaN/inf -> None, so the page's JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def render_html(points: Sequence[Point], *, study_name: str, task: str, metric_name: str, objectives: Sequence[str],
                tracking: str = "", plotly_js: str | None = None) -> str:
    """The whole page as one string. `plotly_js=None` inlines the plotly.js shipped with the plotly package."""
    if plotly_js is None:
        from plotly.offline import get_plotlyjs

        plotly_js = get_plotlyjs()
    rows = front_rows(points, metric_name)
    complete = sum(p.state == "COMPLETE" for p in points)
    specs = {p.trial: {"spec": p.spec, "summary": p.spec_summary, "export": p.export_command,
                       "run": p.mlflow_run_id, "metric": p.metric, "params": p.params, "memory": p.memory_mb}
             for p in points if _plottable(p)}
    summary = (f"{complete} complete, {len(points) - complete} failed, {len(rows)} on the Pareto front of "
               f"{' / '.join(objectives)}. Updated {time.strftime('%Y-%m-%d %H:%M:%S')}.")
    page = Template(TEMPLATE.read_text())
    return page.substitute(
        title=html.escape(f"autopeft · Pareto report · {study_name}"),
        study=html.escape(study_name), task=html.escape(task), summary=html.escape(summary),
        tracking=html.escape(tracking), metric_name=html.escape(metric_name),
        front_table=_front_table(rows, metric_name), failed_table=_failed_table(points),
        plotly_js=plotly_js, figure_json=_script_json(_clean(figure_dict(points, metric_name))),
        trials_json=_script_json(_clean(specs)))


# ----- the static picture ----------------------------------------------------------------------------------
def render_png(points: Sequence[Point], path: Path, *, study_name: str, metric_name: str) -> Path:
    """The same plot as a PNG (matplotlib, no browser needed): front labelled with trial numbers."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shown = [p for p in points if _plottable(p)]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        mems = [p.memory_mb or 0.0 for p in shown] or [0.0]
        norm = matplotlib.colors.Normalize(vmin=min(mems), vmax=max(mems) if max(mems) > min(mems) else min(mems) + 1)
        others = [p for p in shown if not p.on_front and p.feasible]
        front = sorted((p for p in shown if p.on_front), key=lambda p: p.params or 0)
        bad = [p for p in shown if not p.feasible]
        sc = None
        if others:
            sc = ax.scatter([p.params for p in others], [p.metric for p in others], c=[p.memory_mb for p in others],
                            cmap="viridis", norm=norm, s=40, alpha=0.75, edgecolors="#555", linewidths=0.5,
                            label=f"other trials ({len(others)})")
        if bad:
            ax.scatter([p.params for p in bad], [p.metric for p in bad], c="#999", marker="x", s=40,
                       label=f"infeasible ({len(bad)})")
        if front:
            sc = ax.scatter([p.params for p in front], [p.metric for p in front], c=[p.memory_mb for p in front],
                            cmap="viridis", norm=norm, s=110, marker="D", edgecolors="black", linewidths=1.5,
                            label=f"Pareto front ({len(front)})", zorder=3)
            for p in front:
                ax.annotate(f"#{p.trial}", (p.params, p.metric), textcoords="offset points", xytext=(6, 6),
                            fontsize=8)
        if sc is not None:
            fig.colorbar(sc, ax=ax, label="peak memory (MiB)")
        if shown and min(p.params or 1 for p in shown) > 0:
            ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"{metric_name} (held-out)")
        ax.set_title(f"{study_name}: {len(front)} on the front of {len(shown)} complete trials")
        ax.grid(True, which="major", alpha=0.3)
        if shown:
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no completed trial yet", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


# ----- all three ----------------------------------------------------------------------------------------------
def write_report(study: optuna.Study, front: Iterable[int], out_dir: Path, *, export: Callable[[int], str],
                 run_ids: dict[int, str] | None = None, tracking: str = "", png: bool = True) -> dict[str, Path]:
    """Write report.html, front.png and front.json for the study's current state into `out_dir`.

    Files are written to temporary names and renamed, so a reader (or an upload) never sees half a file.
    """
    points = points_of(study, front, export, run_ids)
    attrs = study.user_attrs
    metric_name = next((t.user_attrs["metric_name"] for t in study.get_trials(deepcopy=False)
                        if "metric_name" in t.user_attrs), "metric")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"html": out_dir / REPORT_HTML, "json": out_dir / FRONT_JSON}
    page = render_html(points, study_name=study.study_name, task=str(attrs.get("task", "")), metric_name=metric_name,
                       objectives=attrs.get("objectives") or ["metric", "params", "memory"], tracking=tracking)
    _atomic_write(paths["html"], page)
    _atomic_write(paths["json"], json.dumps(_clean(front_rows(points, metric_name)), indent=2))
    if png:
        tmp = out_dir / f".{FRONT_PNG}.tmp.png"
        render_png(points, tmp, study_name=study.study_name, metric_name=metric_name)
        tmp.replace(out_dir / FRONT_PNG)
        paths["png"] = out_dir / FRONT_PNG
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
