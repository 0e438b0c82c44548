"""`autopeft export`: a trained `PeftSpec` -> a directory people can load without autopeft's search.

Always written: `autopeft.yaml` (task, backbone, spec, fidelity: what `autopeft train --config` reads),
`autopeft_weights.safetensors` (every trainable tensor, for `autopeft.load`), `metrics.json` and a `README.md`
model card. Where HF PEFT can express the spec exactly (one method: LoRA, DoRA or IA3), the directory is also a
standard HF PEFT adapter dir (`adapter_config.json` + `adapter_model.safetensors` at its top level), so
`peft.PeftModel.from_pretrained(base, DEST)` computes the same logits as our model. Where the AdapterHub
`adapters` library can express it exactly (bottleneck adapters, serial and parallel, with per-layer sizes; flat
prefix-tuning; LoRA; IA3; mixes of these in one ConfigUnion), `DEST/adapterhub/` holds that format (see
`autopeft.export_adapterhub` for the layout, the math and what it cannot express). Anything a library would
compute differently is not written, and the report says why: a file that loads but answers differently is
worse than no file.

The directory is built in a temp dir beside DEST and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autopeft.errors import UserError
from autopeft.loading import CONFIG_FILE, WEIGHTS_FILE, build, head_shape, read_weights
from autopeft.spec import PeftSpec

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial
    from torch import nn

FORMATS = ("auto", "hf", "adapters", "autopeft")
HF_CONFIG_FILE = "adapter_config.json"
HF_WEIGHTS_FILE = "adapter_model.safetensors"
#: HF PEFT prefix-tuning, checked on this stack (tests/test_export.py holds canaries for both halves)
PREFIX_CANNOT_RUN = ("peft {peft} cannot run prefix-tuning on transformers {tf} classifiers: it hands the prefix to "
                     "the model as a `past_key_values` argument, which transformers 5 renamed `cache` (peft raises "
                     "'Model does not support past key values'), so an HF prefix adapter would load but not run")
PREFIX_SHIFTS = ("; and where it runs, that KV cache also shifts the real tokens' position ids by "
                 "num_virtual_tokens, so this {family} model's absolute position embeddings would give other logits "
                 "than autopeft's prefix, which keeps positions 0..n-1")
PREFIX_ROTARY = ("; under rotary positions (this {family} model) the shift cancels, so this spec becomes exportable "
                 "once peft passes the prefix as `cache`")


def prefix_reason(model: nn.Module) -> str:
    """Why an ungated, uniform-length prefix is not written as HF PEFT prefix-tuning, for this model."""
    import peft
    import transformers

    from autopeft.models import architecture_of

    family = architecture_of(model).family
    absolute = getattr(getattr(model, "config", None), "position_embedding_type", "absolute") == "absolute"
    rotary = family == "llama"
    why = PREFIX_CANNOT_RUN.format(peft=peft.__version__, tf=transformers.__version__)
    return why + (PREFIX_ROTARY if rotary else PREFIX_SHIFTS if absolute else "").format(family=family)


class NotExpressible(Exception):
    """The spec has no exact HF PEFT equivalent; the message says why (shown to the user)."""


@dataclass
class HfAdapter:
    """An HF PEFT adapter: `adapter_config.json` contents and `adapter_model.safetensors` tensors."""

    method: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass
class ExportReport:
    """What an export wrote (format -> files) and, for each format not written, why."""

    dest: Path
    spec_summary: str
    written: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    hf_method: str | None = None
    adapters_method: str | None = None
    source: str | None = None

    def lines(self) -> list[str]:
        """The terminal report of `autopeft export`: one line per format, reasons included."""
        from autopeft.export_adapterhub import ADAPTERHUB_DIR, LOAD_HINT

        out = [f"exported {self.source + ' ' if self.source else ''}({self.spec_summary}) to {self.dest}"]
        how = {"autopeft": f"load with autopeft.load(base, {str(self.dest)!r}); retrain with "
                           f"autopeft train --config {self.dest / CONFIG_FILE} --fidelity full",
               "hf-peft": f"{self.hf_method}; load with peft.PeftModel.from_pretrained(base, {str(self.dest)!r})",
               "adapters": f"AdapterHub {self.adapters_method}; load with "
                           + LOAD_HINT.format(path=str(self.dest / ADAPTERHUB_DIR)),
               "model card": "task, spec, metrics, how to load and retrain"}
        for fmt, files in self.written.items():
            out.append(f"  wrote {fmt}: {', '.join(files)}" + (f" ({how[fmt]})" if fmt in how else ""))
        for fmt, why in self.skipped.items():
            out.append(f"  not written {fmt}: {why}")
        return out


# ----- HF PEFT mapping -----------------------------------------------------------------------------------------
def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _module_universe(model: nn.Module) -> list[str]:
    """Module names as HF PEFT will see them on a fresh backbone: our wrappers stand for the layer they wrap."""
    names = []
    for name, _ in model.named_modules():
        if not name or "autopeft_" in name or name.endswith(".base_layer") or ".base_layer." in name:
            continue
        names.append(name)
    return names


def _layers_prefix(model: nn.Module) -> str:
    from autopeft.models import get_layers

    layers = get_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise NotExpressible("cannot locate the backbone's layer list")


def _hf_matches(key: str, targets: list[str], layers: list[int] | None, pattern: str) -> bool:
    """HF PEFT's list matching (`check_target_module_exists`): exact name, or a '.'-suffix in the chosen layers."""
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    if layers is None:
        return True
    m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
    return m is not None and int(m["idx"]) in layers


def _name_regex(names: list[str], prefix: str, sites: Mapping[str, tuple[int, str]]) -> str:
    """One regex (HF fullmatches a string `target_modules`) naming exactly `names`: per layer-relative path, its
    layers, e.g. `bert\\.encoder\\.layer\\.(?:0|2)\\.attention\\.self\\.query`."""
    groups: dict[str, list[int]] = {}
    for n in names:
        layer, rel = sites[n]
        groups.setdefault(rel, []).append(layer)
    alts = [f"{re.escape(prefix)}(?:{'|'.join(str(i) for i in sorted(ls))})\\.{re.escape(rel)}"
            for rel, ls in sorted(groups.items())]
    return "(?:" + "|".join(alts) + ")"


def _targets(model: nn.Module, sites: Mapping[str, tuple[int, str]], num_layers: int, prefix: str,
             feedforward: set[str] | None = None) -> dict[str, Any]:
    """`target_modules` (+ `layers_to_transform`, `feedforward_modules`) that select exactly `sites`.

    The compact form (module paths relative to a layer, plus the layer indices) when HF's suffix matching selects
    exactly these modules with it; otherwise a full-name regex, which HF fullmatches. For BERT, `output.dense`
    (ffn_out) is also a suffix of `attention.output.dense` (o), so e.g. IA3 on ffn_out without o needs the regex.
    Both forms are checked here against every module name of the model, the way HF matches them.
    """
    from autopeft.models import architecture_of

    universe = _module_universe(model)
    wanted = set(sites)
    ff_wanted = feedforward or set()
    pattern = architecture_of(model).layers.rsplit(".", 1)[-1]
    by_layer: dict[int, set[str]] = {}
    for layer, rel in sites.values():
        by_layer.setdefault(layer, set()).add(rel)
    if len({frozenset(v) for v in by_layer.values()}) == 1:
        rels = sorted(next(iter(by_layer.values())))
        layers = sorted(by_layer) if len(by_layer) < num_layers else None
        ff = sorted({sites[n][1] for n in ff_wanted})
        # HF's feed-forward test on a list is a plain `endswith` (no '.' boundary)
        if ({k for k in universe if _hf_matches(k, rels, layers, pattern)} == wanted
                and all(any(k.endswith(f) for f in ff) == (k in ff_wanted) for k in wanted)):
            out: dict[str, Any] = {"target_modules": rels, "layers_to_transform": layers,
                                   "layers_pattern": pattern if layers is not None else None}
            if feedforward is not None:
                out["feedforward_modules"] = ff
            return out
    regex = _name_regex(sorted(wanted), prefix, sites)
    out = {"target_modules": regex, "layers_to_transform": None, "layers_pattern": None}
    ok = {k for k in universe if re.fullmatch(regex, k)} == wanted
    if feedforward is not None:
        ff_regex = _name_regex(sorted(ff_wanted), prefix, sites) if ff_wanted else []
        out["feedforward_modules"] = ff_regex
        ok = ok and {k for k in wanted if ff_wanted and re.fullmatch(ff_regex, k)} == ff_wanted
    if not ok:
        raise NotExpressible("no HF target_modules selects exactly the adapted modules")
    return out


def hf_peft_adapter(model: nn.Module, spec: PeftSpec, *, base_model_name_or_path: str | None = None) -> HfAdapter:
    """The HF PEFT adapter that computes exactly what `model` (injected with `spec`) computes.

    Raises `NotExpressible` with the reason when there is none: mixed methods, bottleneck adapters, BitFit,
    prefix-tuning (see `prefix_reason`), a spec that trains the head alone.
    """
    from autopeft.models import architecture_of
    from autopeft.peft.linear import PeftLinear

    methods = spec.methods()
    if not methods:
        raise NotExpressible("the spec trains only the task head; an HF PEFT adapter needs a PEFT method")
    if len(methods) > 1:
        raise NotExpressible(f"several methods mixed ({' + '.join(methods)}); an HF PEFT adapter holds one method")
    method = methods[0]
    if method in ("serial_adapter", "parallel_adapter"):
        raise NotExpressible("HF PEFT has no bottleneck (serial/parallel) adapters")
    if method == "bitfit":
        raise NotExpressible("HF PEFT cannot train only the biases of chosen layers (LoRA's bias='all' trains "
                             "every bias and adds LoRA)")
    if method == "prefix":
        if spec.prefix_gate:
            raise NotExpressible("a gated prefix (gate: true) attends through its own softmax and a per-head gate, "
                                 "which HF PEFT's prefix-tuning does not have")
        if len(set(spec.prefix)) > 1:
            raise NotExpressible(f"prefix lengths differ across layers ({list(spec.prefix)}); HF prefix-tuning puts "
                                 "one num_virtual_tokens in every layer")
        raise NotExpressible(prefix_reason(model))
    arch = architecture_of(model)
    prefix = _layers_prefix(model)
    sites: dict[str, tuple[int, str]] = {}
    modules: dict[str, PeftLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, PeftLinear):
            layer, _, rel = name.removeprefix(prefix).partition(".")
            if not name.startswith(prefix) or not layer.isdigit():
                raise NotExpressible(f"adapted module {name} is outside the backbone's layers")
            sites[name], modules[name] = (int(layer), rel), module
    if not sites:
        raise NotExpressible("the model carries no adapted layer")

    tensors: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def put(ours: str, hf: str, tensor: torch.Tensor) -> None:
        tensors[f"base_model.model.{hf}"] = tensor.detach().float().cpu().contiguous()
        used.add(ours)

    common = {"task_type": "SEQ_CLS", "base_model_name_or_path": base_model_name_or_path, "revision": None,
              "inference_mode": True, "fan_in_fan_out": False,
              "modules_to_save": [h for h in arch.head if hasattr(model, h)]}
    if method in ("lora", "dora"):
        ranks = {n: m.rank for n, m in modules.items()}
        if any(m.ia3 for m in modules.values()) or not all(ranks.values()):
            raise NotExpressible("LoRA and IA3 on the same layers; an HF PEFT adapter holds one method")
        counts = Counter(ranks.values())
        r = max(counts, key=lambda k: (counts[k], k))  # the most common rank is the default, the rest are patterns
        odd = {n: k for n, k in ranks.items() if k != r}
        config = {"peft_type": "LORA", **common, "r": r, "lora_alpha": _number(spec.lora_alpha(r)),
                  "lora_dropout": spec.lora_dropout, "use_rslora": spec.lora_rslora, "use_dora": spec.dora,
                  "bias": "none", "init_lora_weights": True,
                  **_targets(model, sites, spec.num_layers, prefix),
                  "rank_pattern": {re.escape(n): k for n, k in odd.items()},
                  "alpha_pattern": {re.escape(n): _number(spec.lora_alpha(k)) for n, k in odd.items()}}
        for n, m in modules.items():
            put(f"{n}.autopeft_lora_A", f"{n}.lora_A.weight", m.autopeft_lora_A)
            put(f"{n}.autopeft_lora_B", f"{n}.lora_B.weight", m.autopeft_lora_B)
            if m.dora:  # HF keeps the learned magnitude m and divides by ||W + s·BA|| at run time, as we do
                put(f"{n}.autopeft_dora_magnitude", f"{n}.lora_magnitude_vector", m.autopeft_dora_magnitude)
        label = ("DoRA" if spec.dora else "LoRA") + (" with per-module ranks" if odd else "")
    else:  # ia3
        if any(m.rank for m in modules.values()):
            raise NotExpressible("LoRA and IA3 on the same layers; an HF PEFT adapter holds one method")
        feedforward = {n for n, m in modules.items() if m.ia3 == "in"}
        config = {"peft_type": "IA3", **common, "init_ia3_weights": True,
                  **_targets(model, sites, spec.num_layers, prefix, feedforward)}
        for n, m in modules.items():  # HF: (1, in) when the input is scaled (feed-forward), else (out, 1)
            v = m.autopeft_ia3
            put(f"{n}.autopeft_ia3", f"{n}.ia3_l", v.view(1, -1) if m.ia3 == "in" else v.view(-1, 1))
        label = "IA3"
    head_names = tuple(f"{h}." for h in arch.head)
    for name, p in model.named_parameters():
        if p.requires_grad and name.startswith(head_names):
            put(name, name, p)
    left = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in used)
    if left:
        raise NotExpressible(f"trained tensors HF PEFT has no place for: {', '.join(left[:3])}")
    return HfAdapter(label, {k: v for k, v in config.items() if v is not None or k in common}, tensors)


# ----- writing -------------------------------------------------------------------------------------------------
def check_dest(dest: Path, force: bool) -> None:
    """Refuse a destination that holds anything, before any work is done (unless --force)."""
    if dest.exists() and not dest.is_dir():
        raise UserError(f"destination {dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise UserError(f"destination {dest} exists and is not empty; choose a new directory or pass --force")


def _check_formats(formats: str) -> None:
    if formats not in FORMATS:
        raise UserError(f"unknown export format {formats!r}; use one of {', '.join(FORMATS)}")


def _validated_config(trial_config: Mapping[str, Any], spec: PeftSpec) -> dict[str, Any]:
    """The trial config with this spec, checked the way `autopeft train --config` will read it."""
    from autopeft.config import full_fidelity, trial_config_from_dict
    from autopeft.spec import Fidelity

    cfg = {k: v for k, v in dict(trial_config).items() if v is not None}
    cfg["spec"] = spec.to_dict()
    if not cfg.get("data"):
        cfg.pop("data", None)
    if not cfg.get("full_fidelity"):  # written out, so `--fidelity full` is visible and editable in the file
        cfg["full_fidelity"] = full_fidelity(Fidelity.from_dict(cfg.get("fidelity"))).to_dict()
    trial_config_from_dict(cfg, source="trial config")
    order = ("task", "backbone", "spec", "fidelity", "full_fidelity", "data")
    return {k: cfg[k] for k in order if k in cfg} | {k: v for k, v in cfg.items() if k not in order}


def _json_safe(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(metrics), default=str))


def export_model(model: nn.Module, spec: PeftSpec, dest: str | os.PathLike, *, trial_config: Mapping[str, Any],
                 metrics: Mapping[str, Any] | None, formats: str = "auto", force: bool = False,
                 source: str | None = None) -> ExportReport:
    """Write the export layout for `model` (a backbone injected with `spec`, trained) into `dest`.

    `formats`: "auto" = ours always, HF PEFT and AdapterHub each where it expresses the spec exactly; "hf" /
    "adapters" = as auto, but that format is required (a spec it cannot express is a UserError); "autopeft" =
    ours only. `source` (e.g. "study glue-sst2 trial 7") goes into the report and the model card. Atomic: built
    beside `dest`, then renamed; on any error nothing is left.
    """
    import yaml
    from safetensors.torch import save_file

    from autopeft.export_adapterhub import AdapterHubAdapter, adapterhub_adapter
    from autopeft.model_card import hub_backbone, render_model_card
    from autopeft.peft import trainable_state_dict

    dest = Path(os.path.abspath(dest))
    _check_formats(formats)
    check_dest(dest, force)
    if getattr(model, "autopeft_spec", None) != spec:
        raise UserError("the model does not carry this spec; export the model the spec was injected into")
    cfg = _validated_config(trial_config, spec)
    weights = trainable_state_dict(model)
    num_labels, _ = head_shape(weights)

    report = ExportReport(dest, spec.summary(), source=source)
    report.written["autopeft"] = [CONFIG_FILE, WEIGHTS_FILE]
    hf: HfAdapter | None = None
    ah: AdapterHubAdapter | None = None
    if formats == "autopeft":
        report.skipped["hf-peft"] = "not requested (formats='autopeft')"
        report.skipped["adapters"] = "not requested (formats='autopeft')"
    else:
        try:
            hf = hf_peft_adapter(model, spec, base_model_name_or_path=hub_backbone(cfg.get("backbone")))
        except NotExpressible as exc:
            if formats == "hf":
                raise UserError(f"cannot write the HF PEFT format for {spec.summary()}: {exc}") from None
            report.skipped["hf-peft"] = f"{exc}; use autopeft.load"
        try:
            ah = adapterhub_adapter(model, spec, model_name=hub_backbone(cfg.get("backbone")))
        except NotExpressible as exc:
            if formats == "adapters":
                raise UserError(f"cannot write the AdapterHub `adapters` format for {spec.summary()}: "
                                f"{exc}") from None
            report.skipped["adapters"] = f"{exc}; use autopeft.load"
    if hf is not None:
        report.written["hf-peft"] = [HF_CONFIG_FILE, HF_WEIGHTS_FILE]
        report.hf_method = hf.method
    if ah is not None:
        report.written["adapters"] = ah.files()
        report.adapters_method = ah.method
    report.written["model card"] = ["README.md"] + (["metrics.json"] if metrics else [])

    created = _make_parents(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    try:
        header = f"# autopeft export{' of ' + source if source else ''}: {spec.summary()}\n"
        body = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
        (tmp / CONFIG_FILE).write_text(header + body, encoding="utf-8")
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if hf is not None:
            (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf.config, indent=2) + "\n", encoding="utf-8")
            save_file(hf.tensors, str(tmp / HF_WEIGHTS_FILE), metadata={"format": "pt"})
        if ah is not None:
            ah.write(tmp)
        if metrics:
            (tmp / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2) + "\n", encoding="utf-8")
        card = render_model_card(spec=spec, trial_config=cfg, metrics=metrics, written=report.written,
                                 skipped=report.skipped, num_labels=num_labels, hf_method=report.hf_method,
                                 adapters_method=report.adapters_method,
                                 source=source, dir_name=dest.name)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return report


def _make_parents(parent: Path) -> list[Path]:
    """Create missing parents; return them deepest first so a failed export can remove what it made."""
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished temp dir to `dest`; an old `dest` (only with --force) is swapped out, then removed."""
    if not dest.exists():
        tmp.rename(dest)
        return
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----- from a study --------------------------------------------------------------------------------------------
PICK_RULES = "best-metric, smallest-within X (X in percentage points of the metric, e.g. 'smallest-within 0.5')"


def _feasible(t: FrozenTrial) -> bool:
    return all(c <= 0 for c in t.user_attrs.get("constraints") or [])


def parse_pick(pick: str) -> tuple[str, float | None]:
    """'best-metric' -> ('best-metric', None); 'smallest-within 0.5' (or =0.5, :0.5) -> ('smallest-within', 0.5)."""
    text = pick.strip().lower()
    if text == "best-metric":
        return "best-metric", None
    m = re.fullmatch(r"smallest-within[\s=:]+([0-9]*\.?[0-9]+)", text)
    if m:
        return "smallest-within", float(m[1])
    raise UserError(f"unknown --pick rule {pick!r}; use {PICK_RULES}")


def select_trial(study: optuna.Study, *, trial: int | None, pick: str | None) -> FrozenTrial:
    """The trial to export: `--trial N` (must be COMPLETE), or a `--pick` rule over the feasible ones.

    best-metric: the highest held-out metric among feasible COMPLETE trials (ties: fewer params).
    smallest-within X: the fewest trainable params among Pareto-front trials whose metric is within X points
    (metric x 100) of the front's best; the front is `front_rows`, what `autopeft front` prints.
    """
    from optuna.trial import TrialState

    from autopeft.worker import FAIL_REASON, SHADOW_ATTR

    if (trial is None) == (pick is None):
        raise UserError("give exactly one of --trial N or --pick RULE")
    name = study.study_name
    trials = study.get_trials(deepcopy=False)
    if trial is not None:
        found = [t for t in trials if t.number == trial]
        if not found:
            have = f"0..{max(t.number for t in trials)}" if trials else "none yet"
            raise UserError(f"study {name!r} has no trial {trial} (its trials: {have}); "
                            f"see autopeft front --study {name}")
        t = found[0]
        if t.state == TrialState.FAIL:
            reason = t.user_attrs.get(FAIL_REASON, "error")
            raise UserError(f"trial {trial} of study {name!r} FAILED ({reason}); only COMPLETE trials have weights "
                            f"to export, see autopeft front --study {name}")
        if t.state != TrialState.COMPLETE:
            raise UserError(f"trial {trial} of study {name!r} is {t.state.name}, not COMPLETE; nothing to export yet")
        if SHADOW_ATTR in t.user_attrs:  # autopeft.worker.record_infeasible: never trained
            of = t.user_attrs[SHADOW_ATTR]
            reason = t.user_attrs.get(FAIL_REASON, "infeasible")
            raise UserError(f"trial {trial} of study {name!r} only tells the sampler that trial {of} was infeasible "
                            f"({reason}); it was never trained. See autopeft front --study {name}")
        return t
    rule, within = parse_pick(pick or "")
    if rule == "best-metric":
        done = [t for t in trials if t.state == TrialState.COMPLETE and _feasible(t)
                and t.user_attrs.get("metric") is not None]
        if not done:
            raise UserError(f"study {name!r} has no COMPLETE feasible trial to pick from")
        return max(done, key=lambda t: (t.user_attrs["metric"], -(t.user_attrs.get("trainable_params") or 0),
                                        -t.number))
    from autopeft.front import front_rows

    rows = [r for r in front_rows(study) if r["metric"] is not None]
    if not rows:
        raise UserError(f"study {name!r} has no COMPLETE feasible trial on its front to pick from")
    best = max(r["metric"] for r in rows)
    assert within is not None
    close = [r for r in rows if (best - r["metric"]) * 100 <= within + 1e-9]
    chosen = min(close, key=lambda r: (r["params"] or 0, -r["metric"], r["trial"]))
    return next(t for t in trials if t.number == chosen["trial"])


def _trial_config(study: optuna.Study) -> dict[str, Any]:
    a = study.user_attrs
    missing = [k for k in ("task", "backbone") if not a.get(k)]
    if missing:
        raise UserError(f"study {study.study_name!r} lacks {', '.join(missing)}; it was not made by autopeft search")
    data = {k: v for k, v in (a.get("data") or {}).items() if v not in (None, False)}
    cfg: dict[str, Any] = {"task": a["task"], "backbone": a["backbone"], "fidelity": a.get("fidelity") or {}}
    if data:
        cfg["data"] = data
    return cfg


def _trial_metrics(t: FrozenTrial) -> dict[str, Any]:
    keys = ("metric_name", "metric", "dev_metric", "trainable_params", "backbone_params", "trainable_pct",
            "peak_memory_mb", "train_seconds", "eval_seconds", "tokens_per_s", "train_loss", "steps", "extra")
    return {k: t.user_attrs[k] for k in keys if t.user_attrs.get(k) is not None}


def export_trial(study_name: str, *, out: str | None = None, storage: str | None = None, trial: int | None = None,
                 pick: str | None = None, dest: str | os.PathLike, force: bool = False,
                 formats: str = "auto") -> ExportReport:
    """Rebuild a trial's trained model from its saved weights (no retraining) and export it.

    Every cheap check (destination, format, study, trial) runs before the backbone is loaded, and the model is
    rebuilt exactly as the trial built it: backbone (head size from the saved head) + inject(spec) + a strict
    load of every trainable tensor.
    """
    from autopeft.front import load_existing_study, resolve_storage
    from autopeft.models import load_backbone

    dest_path = Path(os.path.abspath(dest))
    _check_formats(formats)
    check_dest(dest_path, force)
    study = load_existing_study(study_name, resolve_storage(out, storage))
    t = select_trial(study, trial=trial, pick=pick)
    cfg = _trial_config(study)
    attrs = t.user_attrs
    if not isinstance(attrs.get("spec"), Mapping):
        raise UserError(f"trial {t.number} of study {study_name!r} has no spec recorded")
    if not attrs.get("weights_path"):
        raise UserError(f"trial {t.number} of study {study_name!r} has no saved weights (weights_path); it ran "
                        "before weights were kept: retrain it with autopeft train")
    spec = PeftSpec.from_dict(attrs["spec"], num_layers=study.user_attrs.get("num_layers"))
    weights_path = Path(attrs["weights_path"])
    if not weights_path.is_file() and storage is None:  # the --out dir was moved or copied: look inside it
        moved = Path(out or "autopeft-runs") / "artifacts" / study_name / f"trial-{t.number}" / WEIGHTS_FILE
        weights_path = moved if moved.is_file() else weights_path
    weights = read_weights(weights_path)
    num_labels, regression = head_shape(weights)
    regression = bool((cfg.get("data") or {}).get("regression", regression))
    model, _ = load_backbone(cfg["backbone"], num_labels, regression=regression)
    build(model, spec, weights, source=f"weights of trial {t.number} ({weights_path})")
    return export_model(model, spec, dest_path, trial_config={**cfg, "spec": spec.to_dict()},
                        metrics=_trial_metrics(t), formats=formats, force=force,
                        source=f"study {study_name} trial {t.number}")


def pick_and_dest(pick: str | Sequence[str] | None, dest: str | None) -> tuple[str | None, str]:
    """Split `--pick` tokens from DEST: argparse's `--pick` takes `nargs="+"` (for `smallest-within 0.5`), so in
    `--pick smallest-within 0.5 OUT/` the destination arrives as the rule's last token."""
    if pick is not None and not isinstance(pick, str):
        tokens = list(pick)
        n = 2 if tokens and tokens[0].lower() == "smallest-within" else 1
        pick, rest = " ".join(tokens[:n]), tokens[n:]
        if rest:
            if dest is not None or len(rest) > 1:
                raise UserError(f"unexpected argument(s) after --pick {pick}: {' '.join(rest)}")
            dest = rest[0]
    if not dest:
        raise UserError("give the destination directory: autopeft export --study NAME (--trial N | --pick RULE) DEST")
    return pick, dest


def export_command(study: str, *, dest: str | None, out: str | None = None, storage: str | None = None,
                   trial: int | None = None, pick: str | Sequence[str] | None = None, force: bool = False,
                   formats: str = "auto") -> int:
    """`autopeft export`: export one trial and print which formats were written, and why others were not.

    `pick` may be the raw `--pick` tokens (see `pick_and_dest`), so the CLI stays argument parsing only.
    """
    pick, dest = pick_and_dest(pick, dest)
    report = export_trial(study, out=out, storage=storage, trial=trial, pick=pick, dest=dest, force=force,
                          formats=formats)
    print("\n".join(report.lines()))
    return 0
