"""The AdapterHub (`adapters` library) format of an export, written without importing `adapters`.

`adapters` 1.3 (its newest release) pins transformers~=4.57.6, so it cannot be installed beside the
transformers 5 this project runs on; the files are therefore written here, to the layout and key names
`model.save_adapter(DIR, "autopeft", use_safetensors=True)` of adapters 1.3 produces, and checked by a round
trip through the real library in a side environment (tests/test_export_adapterhub.py, `make adapters-env`).

Layout, under the export directory:

    adapterhub/adapter_config.json     the adapter: one method config, or a ConfigUnion of several
    adapterhub/adapter.safetensors     its weights, named as in an adapters-initialised model
    adapterhub/head_config.json        the classification head (a static HF head: `classifier.*`)
    adapterhub/model_head.safetensors

Loading it (in an environment with adapters 1.3.x and transformers 4.57.x):

    model = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=N)
    adapters.init(model)
    name = model.load_adapter("DEST/adapterhub", use_safetensors=True)  # the head comes along
    model.set_active_adapters(name)

Only what adapters computes exactly as autopeft does is written (read from adapters 1.3's source, per BERT
layer; x is the FFN block's input, y the output of its `output.dense`):

- serial adapter, Pfeiffer placement: ours is LN(y + up(act(down(y))) + x). That is a BnConfig with
  `output_adapter`, `original_ln_before: false`, `original_ln_after: true`, `residual_before_ln: true`, not
  adapters' own "seq_bn" preset (which puts the adapter after the LayerNorm). Houlsby adds `mh_adapter` (the
  same after the attention output). Per-layer sizes are a per-layer `reduction_factor`; size 0 is `leave_out`.
- parallel adapter: ours is LN(y + s * up(act(down(x))) + x) = BnConfig `is_parallel` with `scaling: s`.
- prefix (ungated, one length in every prefixed layer): adapters' flat prefix-tuning concatenates the prefix
  keys/values in front of each layer's own, visible to every query, positions untouched, as ours does; the
  `control_trans` vector holds (length, 2 x layers, heads, head_dim).
- LoRA (one rank, one set of modules among q/k/v/ffn_in/ffn_out in every adapted layer): Wx + b + (alpha/r) x
  A^T B^T; our scaling (rsLoRA's too) is written as alpha = scaling * r.
- IA3 on q/k/v/ffn_in: (Wx + b) * l, a LoRAConfig in "scale" mode.
- several of these at once: one ConfigUnion, as long as adapters' rule of one module per location and layer
  holds (a serial and a parallel adapter in the same layer both sit at the FFN output; LoRA and IA3 are both
  LoRA-family configs, and adapters refuses two of those in one adapter).

Everything else is refused with the reason (`NotExpressible`): DoRA (adapters divides by ||W + BA|| without
the LoRA scaling and rescales the bias too), BitFit (adapters has none), the gated prefix (adapters' gate is a
sigmoid of the hidden states on keys and values, not a per-head gate on a separate softmax), prefix lengths
that differ between layers, LoRA on `o` (adapters wraps only q/k/v and the FFN linears), IA3 on o/ffn_out (ours
scales the input there, adapters the output), per-layer LoRA ranks or module sets, and backbones outside the
BERT family.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autopeft.export import NotExpressible, _layers_prefix, _number
from autopeft.spec import MODULES, PeftSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTERHUB_DIR = "adapterhub"
ADAPTER_NAME = "autopeft"
#: the adapters release whose code the mapping follows and whose round trip the tests run
ADAPTERS_VERSION = "1.3.0"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "model_head.safetensors"
#: model types whose layers adapters 1.3 adapts with its BERT mixins (BertLayerAdaptersMixin), where the
#: placements above were derived
FAMILIES = ("bert", "roberta", "xlm-roberta", "electra")
#: module type -> adapters' LoRA location (`<location>_lora` in LoRAConfig) and, in self-attention, its matrix
LORA_LOCATIONS = {"q": "selfattn", "k": "selfattn", "v": "selfattn", "ffn_in": "intermediate", "ffn_out": "output"}
#: the activation names adapters hands to transformers' `get_activation` for ours (all exact: gelu is erf)
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "tanh": "tanh"}
#: where the format loads; measured: `pip install adapters` (1.3.0, the newest) requires transformers~=4.57.6
ENVIRONMENT = (f"adapters {ADAPTERS_VERSION.rsplit('.', 1)[0]}.x with transformers 4.57.x (adapters pins "
               "transformers~=4.57.6, so it cannot be installed beside transformers 5; autopeft writes this format "
               "without it)")
LOAD_HINT = ("adapters.init(model); model.load_adapter({path!r}, use_safetensors=True); "
             f"model.set_active_adapters({ADAPTER_NAME!r}) (adapters {ADAPTERS_VERSION}, transformers 4.57)")


@dataclass
class AdapterHubAdapter:
    """An AdapterHub adapter dir's contents: configs and tensors of the adapter and of the head."""

    method: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    head_config: dict[str, Any]
    head_tensors: dict[str, torch.Tensor]

    @staticmethod
    def files() -> list[str]:
        return [f"{ADAPTERHUB_DIR}/{f}" for f in (CONFIG_FILE, WEIGHTS_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE)]

    def write(self, root: Path) -> None:
        """Write `ADAPTERHUB_DIR` under `root` (the export's temp dir, so a failure leaves nothing behind)."""
        from safetensors.torch import save_file

        out = root / ADAPTERHUB_DIR
        out.mkdir()
        for name, data in ((CONFIG_FILE, self.config), (HEAD_CONFIG_FILE, self.head_config)):
            (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(self.tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        save_file(self.head_tensors, str(out / HEAD_WEIGHTS_FILE), metadata={"format": "pt"})


def reduction_factor(hidden: int, size: int) -> float:
    """A float r with `int(hidden // r) == size`, the bottleneck size adapters derives from a reduction factor
    (hidden / size itself can land a hair above, where floor division would give size - 1)."""
    r = hidden / size
    for _ in range(8):
        if int(hidden // r) == size:
            return r
        r = math.nextafter(r, 0.0)
    raise NotExpressible(f"no reduction_factor gives a bottleneck of {size} from hidden size {hidden}")


def _leave_out(values: tuple) -> list[int]:
    return [i for i, v in enumerate(values) if not v]


def _bottleneck_config(sizes: tuple[int, ...], hidden: int, activation: str, *, houlsby: bool,
                       parallel: bool, scale: float) -> dict[str, Any]:
    """BnConfig fields; every knob that changes the math is written out, not left to adapters' defaults."""
    factors = {str(i): reduction_factor(hidden, s) for i, s in enumerate(sizes) if s}
    distinct = set(factors.values())
    return {"mh_adapter": houlsby, "output_adapter": True,
            "reduction_factor": distinct.pop() if len(distinct) == 1 else factors,
            "non_linearity": ACTIVATIONS[activation], "original_ln_before": False, "original_ln_after": True,
            "residual_before_ln": True, "adapter_residual_before_ln": False, "ln_before": False, "ln_after": False,
            "is_parallel": parallel, "scaling": float(scale), "use_gating": False, "dropout": 0.0,
            "stochastic_depth": 0.0, "phm_layer": False, "inv_adapter": None, "inv_adapter_reduction_factor": None,
            "cross_adapter": False, "init_weights": "mam_adapter" if parallel else "bert", "init_weights_seed": None,
            "leave_out": _leave_out(sizes)}


def _lora_family_config(module_types: list[str], layers: list[bool], *, r: int, alpha: float, dropout: float,
                        ia3: bool) -> dict[str, Any]:
    locations = {LORA_LOCATIONS[m] for m in module_types}
    return {"architecture": "lora", "selfattn_lora": "selfattn" in locations,
            "intermediate_lora": "intermediate" in locations, "output_lora": "output" in locations,
            "attn_matrices": [m for m in ("q", "k", "v") if m in module_types], "r": r, "alpha": alpha,
            "dropout": dropout, "composition_mode": "scale" if ia3 else "add", "init_weights": "ia3" if ia3 else "lora",
            "init_weights_seed": None, "use_gating": False, "use_dora": False, "vera_d": None, "vera_b": None,
            "dtype": None, "leave_out": _leave_out(tuple(layers))}


def _uniform_modules(per_module: dict[str, tuple], what: str) -> tuple[list[str], list[bool]]:
    """(module types, per-layer on/off) when every adapted layer adapts the same modules, as one adapters config
    must (it picks modules for all layers and can only drop whole layers)."""
    n = len(next(iter(per_module.values())))
    sets = [frozenset(m for m, vs in per_module.items() if vs[i]) for i in range(n)]
    used = {s for s in sets if s}
    if len(used) > 1:
        detail = ", ".join(f"layer {i}: {'/'.join(sorted(s)) or '-'}" for i, s in enumerate(sets))
        raise NotExpressible(f"{what} sits on different modules in different layers ({detail}); an adapters config "
                             "adapts the same modules in every layer and can only leave whole layers out")
    return sorted(used.pop(), key=MODULES.index), [bool(s) for s in sets]


def adapterhub_adapter(model: nn.Module, spec: PeftSpec, *, model_name: str | None = None) -> AdapterHubAdapter:
    """The AdapterHub adapter (and head) that computes exactly what `model` (injected with `spec`) computes.

    Raises `NotExpressible` with every reason that applies when there is none.
    """
    from autopeft.models import architecture_of, get_layers
    from autopeft.peft.count import ModelDims
    from autopeft.peft.lora import lora_scaling

    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise NotExpressible(f"autopeft maps to AdapterHub only BERT-family encoders ({', '.join(FAMILIES)}), whose "
                             f"adapter placement it checked against adapters {ADAPTERS_VERSION}; this backbone is "
                             f"{model_type}")
    methods = spec.methods()
    if not methods:
        raise NotExpressible("the spec trains only the task head; an AdapterHub adapter needs a PEFT method")
    arch = architecture_of(model)
    layers = get_layers(model)
    prefix = _layers_prefix(model)
    base = model.base_model_prefix
    dims = ModelDims.from_config(model.config)
    hidden = dims.hidden
    name = ADAPTER_NAME

    reasons: list[str] = []
    parts: list[tuple[str, dict[str, Any]]] = []
    tensors: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def put(ours: str, theirs: str, tensor: torch.Tensor) -> None:
        tensors[theirs] = tensor.detach().float().cpu().contiguous()
        used.add(ours)

    def refuse(why: str) -> None:
        reasons.append(why)

    if "bitfit" in methods:
        refuse("adapters has no BitFit (training only the biases of chosen layers)")
    if "dora" in methods:
        refuse("adapters' DoRA divides by ||W + BA|| without the LoRA scaling and rescales the bias as well, where "
               "autopeft (like HF PEFT and the DoRA paper) divides by ||W + s·BA|| and adds the bias after")
    serial, parallel = spec.serial_adapter, spec.parallel_adapter
    both = [i for i in range(spec.num_layers) if serial[i] and parallel[i]]
    if both:
        refuse(f"a serial and a parallel adapter share layer(s) {both}: adapters places both at the FFN output and "
               "holds one bottleneck per location and layer in an adapter")
    if "lora" in methods and "ia3" in methods:
        refuse("LoRA and IA3 are both LoRA-family configs in adapters, which allows one of those per adapter")
    if "prefix" in methods:
        lengths = sorted({p for p in spec.prefix if p})
        if spec.prefix_gate:
            refuse("a gated prefix (gate: true) attends through its own softmax and a per-head gate; adapters' "
                   "prefix gate is a sigmoid of the hidden states scaling keys and values")
        elif len(lengths) > 1:
            refuse(f"prefix lengths differ across layers ({list(spec.prefix)}); adapters' PrefixTuningConfig puts "
                   "one prefix_length in every prefixed layer")
    lora_modules = ia3_modules = None
    if "lora" in methods:
        bad = sorted(set(spec.lora) - set(LORA_LOCATIONS))
        ranks = sorted({r for rs in spec.lora.values() for r in rs if r})
        if bad:
            refuse(f"LoRA on {'/'.join(bad)}: adapters wraps only q/k/v and the FFN's input and output linears, not "
                   "the attention output projection")
        if len(ranks) > 1:
            refuse(f"LoRA ranks differ ({'/'.join(map(str, ranks))}); an adapters LoRAConfig has one r")
        try:
            lora_modules = _uniform_modules(spec.lora, "LoRA")
        except NotExpressible as exc:
            refuse(str(exc))
    if "ia3" in methods:
        bad = sorted(set(spec.ia3) - {"q", "k", "v", "ffn_in"})
        if bad:
            refuse(f"IA3 on {'/'.join(bad)}: autopeft (as HF PEFT) scales the input of o and ffn_out, adapters' IA3 "
                   "scales a linear's output")
        try:
            ia3_modules = _uniform_modules(spec.ia3, "IA3")
        except NotExpressible as exc:
            refuse(str(exc))
    try:
        for sizes in (serial, parallel):
            for s in sizes:
                if s:
                    reduction_factor(hidden, s)
    except NotExpressible as exc:
        refuse(str(exc))
    if reasons:
        raise NotExpressible("; ".join(reasons))

    # ----- every method below is expressible: configs and tensors -----
    def bottleneck_tensors(ours_prefix: str, theirs_prefix: str, module: nn.Module) -> None:
        for ours, theirs in (("down_weight", "adapter_down.0.weight"), ("down_bias", "adapter_down.0.bias"),
                             ("up_weight", "adapter_up.weight"), ("up_bias", "adapter_up.bias")):
            put(f"{ours_prefix}.{ours}", f"{theirs_prefix}.adapters.{name}.{theirs}", getattr(module, ours))

    sites = {"ffn": arch.ffn_out.rpartition(".")[0], "attn": arch.attn_out.rpartition(".")[0]}
    if "serial_adapter" in methods:
        houlsby = spec.serial_position == "houlsby"
        parts.append(("serial bottleneck adapter (BnConfig" + (", Houlsby: mh_adapter + output_adapter)" if houlsby
                                                                else ", output_adapter)"),
                      _bottleneck_config(serial, hidden, spec.adapter_activation, houlsby=houlsby, parallel=False,
                                         scale=1.0)))
        for i, size in enumerate(serial):
            if size:
                for site in ("attn", "ffn") if houlsby else ("ffn",):
                    bottleneck_tensors(f"{prefix}{i}.autopeft_serial_{site}", f"{prefix}{i}.{sites[site]}",
                                       getattr(layers[i], f"autopeft_serial_{site}"))
    if "parallel_adapter" in methods:
        parts.append((f"parallel bottleneck adapter (BnConfig is_parallel, scaling {spec.parallel_scale:g})",
                      _bottleneck_config(parallel, hidden, spec.adapter_activation, houlsby=False, parallel=True,
                                         scale=spec.parallel_scale)))
        for i, size in enumerate(parallel):
            if size:
                bottleneck_tensors(f"{prefix}{i}.autopeft_parallel", f"{prefix}{i}.{sites['ffn']}",
                                   layers[i].autopeft_parallel)
    if "prefix" in methods:
        import torch

        length = next(p for p in spec.prefix if p)
        parts.append((f"flat prefix-tuning (PrefixTuningConfig, length {length})",
                      {"architecture": "prefix_tuning", "encoder_prefix": True, "cross_prefix": True, "flat": True,
                       "prefix_length": length, "bottleneck_size": 512, "non_linearity": "tanh", "dropout": 0.0,
                       "use_gating": False, "shared_gating": True, "init_weights_seed": None,
                       "leave_out": _leave_out(spec.prefix)}))
        kv = []
        for i, p in enumerate(spec.prefix):
            if p:
                module = layers[i].get_submodule(arch.attention).autopeft_prefix
                path = f"{prefix}{i}.{arch.attention}.autopeft_prefix"
                used.update({f"{path}.key", f"{path}.value"})
                kv += [module.key.detach(), module.value.detach()]  # (heads, length, head_dim) each
        # adapters views control_trans as (length, 2 x layers, heads, head_dim): key then value of each layer
        flat = torch.stack([t.transpose(0, 1) for t in kv], dim=1).reshape(-1)
        tensors[f"{base}.prefix_tuning.prefix_tunings.{name}.self_prefix.control_trans"] = flat.float().contiguous()

    def linear_tensors(per_module: dict[str, tuple], ours_attr: str, theirs_attr: str, shape: str = "") -> None:
        for m, values in per_module.items():
            for path in arch.modules[m]:
                for i, on in enumerate(values):
                    if on:
                        full = f"{prefix}{i}.{path}"
                        linear = layers[i].get_submodule(path)
                        t = getattr(linear, ours_attr)
                        put(f"{full}.{ours_attr}", f"{full}.loras.{name}.{theirs_attr}",
                            t.view(-1, 1) if shape == "column" else t)

    if lora_modules is not None:
        modules, on = lora_modules
        r = next(r for rs in spec.lora.values() for r in rs if r)
        # adapters scales by alpha / r; rsLoRA's alpha / sqrt(r) is carried in alpha
        alpha = _number(spec.lora_alpha(r) if not spec.lora_rslora else lora_scaling(r, spec.lora_alpha(r), True) * r)
        parts.append((f"LoRA (LoRAConfig r={r}, alpha={alpha:g}, {'/'.join(modules)})",
                      _lora_family_config(modules, on, r=r, alpha=alpha, dropout=spec.lora_dropout, ia3=False)))
        linear_tensors(spec.lora, "autopeft_lora_A", "lora_A")
        linear_tensors(spec.lora, "autopeft_lora_B", "lora_B")
    if ia3_modules is not None:
        modules, on = ia3_modules
        parts.append((f"IA3 (IA3Config, {'/'.join(modules)})",
                      _lora_family_config(modules, on, r=1, alpha=1, dropout=0.0, ia3=True)))
        linear_tensors(spec.ia3, "autopeft_ia3", "lora_B", shape="column")

    head_names = tuple(f"{h}." for h in arch.head)
    head_tensors = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters()
                    if p.requires_grad and n.startswith(head_names)}
    used.update(head_tensors)
    left = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in used)
    if left:
        raise NotExpressible(f"trained tensors the AdapterHub format has no place for: {', '.join(left[:3])}")

    config = parts[0][1] if len(parts) == 1 else {"architecture": "union", "configs": [c for _, c in parts]}
    meta = {"hidden_size": hidden, "model_class": type(model).__name__, "model_name": model_name or "",
            "model_type": model_type, "version": f"adapters.{ADAPTERS_VERSION}"}
    num_labels = int(model.config.num_labels)
    head_config = {**meta, "config": None, "name": None, "num_labels": num_labels,
                   "label2id": {str(k): int(v) for k, v in dict(model.config.label2id).items()}}
    return AdapterHubAdapter(" + ".join(label for label, _ in parts), {**meta, "config": config, "name": name},
                             tensors, head_config, head_tensors)
