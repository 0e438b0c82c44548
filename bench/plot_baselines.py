"""The accuracy/size picture of a `bench/baselines.py` result: dev accuracy (mean ± sd over seeds) against
trainable parameters, HF PEFT baselines beside our adapters and the retrained autopeft front, full fine-tuning as
a line. The README's figure is this script run on the committed results file.

    python bench/plot_baselines.py bench/results/baselines-h200-2026-11-29.json   # -> the same name, .png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

STYLE = {"hf_": ("HF PEFT defaults", "s", "#d62728"), "ours_": ("bottleneck adapters (ours)", "^", "#7f7f7f"),
         "autopeft_": ("autopeft front, retrained", "D", "#1f77b4")}


#: how far below full fine-tuning the figure reaches, in points: the comparison that matters is near the top, and a
#: degenerate point (the head-only trial at ~58%) would otherwise squash every other one into a few pixels
WINDOW_POINTS = 6.0


def y_window(accs: list[float], fft: float | None) -> tuple[float, float]:
    """The accuracy range (%) shown: from 1 point under the lowest point but at most `WINDOW_POINTS` under full
    fine-tuning, to 1 point over the highest (full fine-tuning included). Points under it are drawn on its lower
    edge, marked and labelled with their value."""
    top = max([*accs, *([fft] if fft is not None else [])]) + 1.0
    low = min(accs) - 1.0
    if fft is not None:
        low = max(low, fft - WINDOW_POINTS)
    return low, top


#: one colour per study when a file holds several (`baselines.py --study A B` or `--merge`)
STUDY_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#bcbd22")


def groups(means: dict[str, dict[str, float]]) -> list[tuple[str, dict[str, dict[str, float]], str, str]]:
    """(legend label, rows, marker, colour) per kind of row; autopeft rows split by study where they name one
    (autopeft_STUDY_trialN)."""
    out = []
    for prefix, (label, marker, color) in STYLE.items():
        rows = {n: v for n, v in means.items() if n.startswith(prefix)}
        if prefix != "autopeft_":
            out.append((label, rows, marker, color))
            continue
        studies: dict[str, dict[str, dict[str, float]]] = {}
        for n, v in rows.items():
            study = n.removeprefix(prefix).rpartition("_trial")[0]
            studies.setdefault(study, {})[n] = v
        for i, (study, members) in enumerate(sorted(studies.items())):
            named = f"{label}: {study}" if study else label
            out.append((named, members, marker, STUDY_COLORS[i % len(STUDY_COLORS)] if study else color))
    return out


def point_label(name: str) -> str:
    """The text beside a point: a baseline's name, a front point's trial ("trial 143"; its study is its colour)."""
    if name.startswith("autopeft_") and (m := re.search(r"trial(\d+)$", name)):
        return f"trial {m.group(1)}"
    for prefix in STYLE:
        name = name.removeprefix(prefix)
    return name


def front_names(means: dict[str, dict[str, float]]) -> set[str]:
    """The autopeft rows that no other autopeft row beats on both accuracy and params: only these are labelled,
    the rest are context (a merged file has ~20 front points)."""
    rows = {n: v for n, v in means.items() if n.startswith("autopeft_")}
    return {n for n, v in rows.items()
            if not any(o["acc"] > v["acc"] and o["params"] <= v["params"] for m, o in rows.items() if m != n)}


def plot(results: Path, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads(results.read_text())
    means = next(r["means"] for r in record["rows"] if r.get("name") == "means")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    fft_acc = 100 * means["full_ft"]["acc"] if "full_ft" in means else None
    low, top = y_window([100 * v["acc"] for n, v in means.items() if n != "full_ft"], fft_acc)
    labelled = front_names(means) | {n for n in means if not n.startswith("autopeft_")}
    for label, rows, marker, color in groups(means):
        inside = {n: v for n, v in rows.items() if 100 * v["acc"] >= low}
        if inside:
            ax.errorbar([v["params"] for v in inside.values()], [100 * v["acc"] for v in inside.values()],
                        yerr=[100 * v["acc_sd"] for v in inside.values()], fmt=marker, color=color, capsize=3,
                        markersize=7, label=label)
        for n, v in rows.items():
            acc = 100 * v["acc"]
            if acc >= low:
                if n in labelled:
                    ax.annotate(point_label(n), (v["params"], acc), textcoords="offset points", xytext=(5, 4),
                                fontsize=7)
            else:  # on the lower edge, pointing down, with its value
                ax.plot([v["params"]], [low + 0.15], marker="v", color=color, markersize=7, linestyle="none",
                        label=None if inside else label)
                ax.annotate(f"{point_label(n)}: {acc:.1f}% (below)", (v["params"], low + 0.15),
                            textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_ylim(low, top)
    if "full_ft" in means:
        fft = 100 * means["full_ft"]["acc"]
        ax.axhline(fft, color="black", linestyle="--", linewidth=1,
                   label=f"full fine-tuning {fft:.1f}% ({means['full_ft']['params']:,} params)")
        ax.axhspan(fft - 0.5, fft, color="black", alpha=0.06, label="within 0.5 points of full FT")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("SST-2 dev accuracy, % (mean ± sd over seeds)")
    ax.set_title(f"{record['bench']} · {record['device']} · {record['date']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")  # the corner no PEFT method reaches: few params, high accuracy
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="a bench/results/baselines-*.json")
    ap.add_argument("--png", type=Path, help="output (default: the results path with .png)")
    args = ap.parse_args()
    print(plot(args.results, args.png or args.results.with_suffix(".png")))


if __name__ == "__main__":
    main()
