"""The README.md of an export: what was found, how well it did, and how to load or retrain it.

Written for the person who picks the export up later (or on the Hugging Face hub, whose card header it carries),
so it names the exact commands and says which formats are missing and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from autopeft.spec import PeftSpec

#: the hub id behind our packaged default backbone, for instructions that must work on another machine
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", MINILM_HUB_ID.lower())

#: metric keys shown first: (key, label, format); any other scalar follows under its own name
_METRIC_LABELS = (
    ("metric", "{name}", "{:.4f}"),
    ("dev_metric", "dev {name}", "{:.4f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("trainable_pct", "trainable % of backbone", "{:.4f}%"),
    ("peak_memory_mb", "peak memory", "{:,.1f} MiB"),
    ("train_seconds", "train time", "{:,.1f} s"),
    ("steps", "train steps", "{:,}"),
    ("train_loss", "final train loss", "{:.4f}"),
)


def hub_backbone(backbone: str | None) -> str | None:
    """The backbone as another machine would load it: our `minilm` alias becomes its hub id."""
    if backbone and backbone.lower() in MINILM_ALIASES:
        return MINILM_HUB_ID
    return backbone


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def metrics_rows(metrics: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(label, value) rows; with a dev metric beside it, `metric` is the search's held-out selection score."""
    if not metrics:
        return []
    name = str(metrics.get("metric_name") or "metric")
    rows = []
    for key, label, fmt in _METRIC_LABELS:
        value = metrics.get(key)
        if value is None:
            continue
        if key == "metric" and metrics.get("dev_metric") is not None:
            label = "held-out {name} (the search's selection score)"
        try:
            rows.append((label.format(name=name), fmt.format(value)))
        except (TypeError, ValueError):
            rows.append((label.format(name=name), _fmt(value)))
    shown = {key for key, _, _ in _METRIC_LABELS} | {"metric_name", "extra", "backbone_params"}
    rows += [(k, _fmt(v)) for k, v in metrics.items()
             if k not in shown and isinstance(v, (int, float)) and not isinstance(v, bool)]
    rows += [(k, _fmt(v)) for k, v in (metrics.get("extra") or {}).items() if isinstance(v, (int, float))]
    return rows


def render_model_card(*, spec: PeftSpec, trial_config: Mapping[str, Any], metrics: Mapping[str, Any] | None,
                      written: Mapping[str, Sequence[str]], skipped: Mapping[str, str], num_labels: int,
                      hf_method: str | None, source: str | None, dir_name: str,
                      adapters_method: str | None = None) -> str:
    """Markdown with a hub card header; every instruction in it is a command that works on this export."""
    backbone = str(trial_config.get("backbone") or "minilm")
    hub = hub_backbone(backbone) or backbone
    tags = ["autopeft", *spec.methods()]
    header: dict[str, Any] = {"base_model": hub, "tags": tags}
    if hf_method:
        header = {"library_name": "peft", **header}
    out = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", ""]
    out += [f"# {spec.summary()}", ""]
    out += [f"A PEFT configuration for **{trial_config.get('task')}** on **{backbone}**"
            + (f", found by autopeft ({source})." if source else ", exported by autopeft."), ""]

    rows = metrics_rows(metrics)
    if rows:
        out += ["## Metrics", "", "| | value |", "| --- | --- |"]
        out += [f"| {k} | {v} |" for k, v in rows]
        out.append("")

    out += ["## Files", ""]
    for fmt, files in written.items():
        out.append(f"- **{fmt}**: {', '.join(f'`{f}`' for f in files)}")
    for fmt, why in skipped.items():
        out.append(f"- not written, **{fmt}**: {why}")
    out.append("")

    labels = f"num_labels={num_labels}"
    if hf_method:
        out += ["## Load with Hugging Face PEFT", "",
                f"The adapter is standard HF PEFT {hf_method} (`adapter_config.json` + `adapter_model.safetensors`),"
                " the classification head included (`modules_to_save`).", "",
                "```python", "from peft import PeftModel",
                "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                f'base = AutoModelForSequenceClassification.from_pretrained("{hub}", {labels})',
                f'model = PeftModel.from_pretrained(base, "{dir_name}").eval()',
                f'tokenizer = AutoTokenizer.from_pretrained("{hub}")', "```", ""]
    if adapters_method:
        from autopeft.export_adapterhub import ADAPTER_NAME, ADAPTERHUB_DIR, ENVIRONMENT

        out += ["## Load with AdapterHub `adapters`", "",
                f"`{ADAPTERHUB_DIR}/` is an AdapterHub adapter ({adapters_method}) with the classification head "
                f"beside it, in the layout `model.save_adapter(..., use_safetensors=True)` writes. It needs "
                f"{ENVIRONMENT}.", "",
                "```python", "import adapters", "from transformers import AutoModelForSequenceClassification", "",
                f'model = AutoModelForSequenceClassification.from_pretrained("{hub}", {labels})',
                "adapters.init(model)",
                f'name = model.load_adapter("{dir_name}/{ADAPTERHUB_DIR}", use_safetensors=True)  # '
                f'"{ADAPTER_NAME}", head included',
                "model.set_active_adapters(name)", "model.eval()", "```", ""]
    out += ["## Load with autopeft", "",
            "Works for every spec, including those HF PEFT and AdapterHub cannot express.", "",
            "```python", "import autopeft", "",
            f'model = autopeft.load("{backbone}", "{dir_name}")  # or autopeft.load(base_model, ...) with a fresh '
            f"backbone of {labels}", "```", ""]
    out += ["## Retrain", "",
            "`autopeft.yaml` holds the task, backbone, spec, the search's `fidelity` and a `full_fidelity`; "
            "`--fidelity full` trains with `full_fidelity` (as written: the whole train set, at least 3 epochs, "
            "no step cap; edit it to taste) and writes this same layout:", "",
            "```bash", f"autopeft train --config {dir_name}/autopeft.yaml --fidelity full --output {dir_name}-full",
            "```", ""]
    spec_yaml = yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None).strip()
    out += ["## Spec", "", "```yaml", spec_yaml, "```", ""]
    return "\n".join(out)
