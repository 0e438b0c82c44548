"""The currencies passed between search, training and export.

`PeftSpec` is pure data: which PEFT method sits in which layer and module, at which rank or size. The
search decodes trial params into one, the injector builds modules from one, export writes one out. It is
always fully expanded (one value per layer) so two specs compare equal exactly when they build the same
model, and so the search space can stay fixed-dimensional (a size of 0 means "off").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from autopeft.errors import UserError

#: Module types a method can be placed on; `models.py` maps each to the architecture's own names.
MODULES: tuple[str, ...] = ("q", "k", "v", "o", "ffn_in", "ffn_out")
#: Every method the injector knows. DoRA is LoRA with a learned magnitude, so it shares LoRA's ranks.
METHODS: tuple[str, ...] = ("lora", "dora", "serial_adapter", "parallel_adapter", "prefix", "ia3", "bitfit")
SERIAL_POSITIONS: tuple[str, ...] = ("pfeiffer", "houlsby")
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "silu", "tanh")

_SPEC_KEYS = {"num_layers", "lora", "dora", "serial_adapter", "parallel_adapter", "prefix", "ia3", "bitfit"}


def _per_layer(value: Any, num_layers: int, what: str, kind: type) -> tuple:
    """Expand a user's per-layer value: a scalar (every layer), a list (one per layer) or {layer: value}."""
    zero = kind(0)
    if isinstance(value, Mapping):
        out = [zero] * num_layers
        for key, v in value.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise UserError(f"{what}: layer key {key!r} is not an integer layer index") from None
            if not 0 <= idx < num_layers:
                raise UserError(
                    f"{what}: layer {idx} is beyond the model's depth (layers 0..{num_layers - 1}); "
                    "use an index below the backbone's number of layers"
                )
            out[idx] = _scalar(v, what, kind)
        return tuple(out)
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise UserError(
                f"{what}: got {len(value)} per-layer values but the backbone has {num_layers} layers; "
                "give one value per layer, a single value, or a {layer: value} mapping"
            )
        return tuple(_scalar(v, what, kind) for v in value)
    return (_scalar(value, what, kind),) * num_layers


def _scalar(v: Any, what: str, kind: type) -> Any:
    if kind is bool:
        if isinstance(v, bool) or v in (0, 1):
            return bool(v)
        raise UserError(f"{what}: expected true/false, got {v!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise UserError(f"{what}: expected a whole number, got {v!r}")
    if v < 0:
        raise UserError(f"{what}: {v} is negative; sizes and ranks are >= 0 (0 means off)")
    return int(v)


def _check_keys(d: Mapping, allowed: set[str] | tuple[str, ...], what: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise UserError(f"{what}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(allowed))}")


@dataclass(frozen=True)
class PeftSpec:
    """One PEFT configuration over a backbone of `num_layers` layers.

    Per-layer tuples have exactly `num_layers` entries; a 0 (or False) entry means the method is absent
    there. `lora` maps module type -> per-layer rank; `ia3` maps module type -> per-layer on/off.
    """

    num_layers: int
    lora: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    lora_alpha_ratio: float = 1.0
    lora_dropout: float = 0.0
    lora_rslora: bool = False
    dora: bool = False
    serial_adapter: tuple[int, ...] = ()
    serial_position: str = "pfeiffer"
    parallel_adapter: tuple[int, ...] = ()
    parallel_scale: float = 4.0
    adapter_activation: str = "relu"
    prefix: tuple[int, ...] = ()
    prefix_gate: bool = True
    ia3: Mapping[str, tuple[bool, ...]] = field(default_factory=dict)
    bitfit: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        n = self.num_layers
        if not isinstance(n, int) or n <= 0:
            raise UserError(f"num_layers must be a positive integer, got {n!r}")
        fix = object.__setattr__
        fix(self, "lora", {m: tuple(int(r) for r in rs) for m, rs in self.lora.items() if any(rs)})
        fix(self, "ia3", {m: tuple(bool(b) for b in bs) for m, bs in self.ia3.items() if any(bs)})
        for name in ("serial_adapter", "parallel_adapter", "prefix"):
            fix(self, name, tuple(int(x) for x in getattr(self, name)) or (0,) * n)
        fix(self, "bitfit", tuple(bool(x) for x in self.bitfit) or (False,) * n)
        for m in list(self.lora) + list(self.ia3):
            if m not in MODULES:
                raise UserError(f"unknown module type {m!r}; known: {', '.join(MODULES)}")
        per_layer = {f"lora.{m}": v for m, v in self.lora.items()}
        per_layer |= {f"ia3.{m}": v for m, v in self.ia3.items()}
        per_layer |= {k: getattr(self, k) for k in ("serial_adapter", "parallel_adapter", "prefix", "bitfit")}
        for what, values in per_layer.items():
            if len(values) != n:
                raise UserError(f"{what}: {len(values)} per-layer values for a {n}-layer backbone")
            if any(v < 0 for v in values):
                raise UserError(f"{what}: negative size {min(values)}; sizes and ranks are >= 0 (0 means off)")
        if self.serial_position not in SERIAL_POSITIONS:
            raise UserError(f"serial_adapter.position {self.serial_position!r} unknown; use one of {SERIAL_POSITIONS}")
        if self.adapter_activation not in ACTIVATIONS:
            raise UserError(f"adapter activation {self.adapter_activation!r} unknown; use one of {ACTIVATIONS}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora dropout {self.lora_dropout} must be in [0, 1)")
        if self.lora_alpha_ratio <= 0:
            raise UserError(f"lora alpha_ratio {self.lora_alpha_ratio} must be > 0")

    # ----- queries -------------------------------------------------------------------------------
    def methods(self) -> list[str]:
        """The methods present, in `METHODS` order."""
        present = {
            "lora": bool(self.lora) and not self.dora,
            "dora": bool(self.lora) and self.dora,
            "serial_adapter": any(self.serial_adapter),
            "parallel_adapter": any(self.parallel_adapter),
            "prefix": any(self.prefix),
            "ia3": bool(self.ia3),
            "bitfit": any(self.bitfit),
        }
        return [m for m in METHODS if present[m]]

    def is_empty(self) -> bool:
        return not self.methods()

    def lora_alpha(self, rank: int) -> float:
        return self.lora_alpha_ratio * rank

    # ----- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON-safe dict that `from_dict` reads back to an equal spec."""
        d: dict[str, Any] = {"num_layers": self.num_layers}
        if self.lora:
            d["lora"] = {
                "rank": {m: list(rs) for m, rs in self.lora.items()},
                "alpha_ratio": self.lora_alpha_ratio,
                "dropout": self.lora_dropout,
                "rslora": self.lora_rslora,
                "dora": self.dora,
            }
        if any(self.serial_adapter):
            d["serial_adapter"] = {"size": list(self.serial_adapter), "position": self.serial_position,
                                   "activation": self.adapter_activation}
        if any(self.parallel_adapter):
            d["parallel_adapter"] = {"size": list(self.parallel_adapter), "scale": self.parallel_scale,
                                     "activation": self.adapter_activation}
        if any(self.prefix):
            d["prefix"] = {"length": list(self.prefix), "gate": self.prefix_gate}
        if self.ia3:
            d["ia3"] = {m: list(bs) for m, bs in self.ia3.items()}
        if any(self.bitfit):
            d["bitfit"] = list(self.bitfit)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], num_layers: int | None = None) -> PeftSpec:
        """Read a user's spec (YAML). Per-layer values may be a scalar, a list or a {layer: value} map.

        `num_layers` comes from the backbone; a spec that states its own must agree with it.
        """
        if not isinstance(d, Mapping):
            raise UserError(f"spec must be a mapping of method -> settings, got {type(d).__name__}")
        unknown = sorted(set(d) - _SPEC_KEYS)
        if unknown:
            raise UserError(
                f"unknown method(s) in spec: {', '.join(map(str, unknown))}; "
                f"known: {', '.join(m for m in METHODS)}"
            )
        n = d.get("num_layers", num_layers)
        if num_layers is not None and n != num_layers:
            raise UserError(f"spec is for {n} layers but the backbone has {num_layers}; drop num_layers or fix it")
        if n is None:
            raise UserError("spec has no num_layers and no backbone was given to take it from")
        kw: dict[str, Any] = {"num_layers": int(n)}
        activation = None
        if "dora" in d and not isinstance(d["dora"], bool):
            # `dora:` as a method of its own: the same settings as `lora:` with the magnitude on.
            if "lora" in d:
                raise UserError("give either lora: (with dora: true inside) or dora:, not both")
            d = {**d, "lora": {**d["dora"], "dora": True}}
        lora = d.get("lora")
        if lora:
            _check_keys(lora, {"rank", "alpha_ratio", "alpha", "dropout", "rslora", "dora"}, "lora")
            ranks = lora.get("rank")
            if not isinstance(ranks, Mapping):
                raise UserError("lora.rank must map module type -> rank, e.g. {q: 8, v: 8}")
            _check_keys(ranks, MODULES, "lora.rank")
            kw["lora"] = {m: _per_layer(r, kw["num_layers"], f"lora.rank.{m}", int) for m, r in ranks.items()}
            if "alpha" in lora and "alpha_ratio" in lora:
                raise UserError("lora: give alpha or alpha_ratio, not both")
            if "alpha" in lora:
                present = {r for rs in kw["lora"].values() for r in rs if r}
                if len(present) > 1:
                    raise UserError("lora.alpha with mixed ranks is ambiguous; use alpha_ratio (alpha = ratio * rank)")
                kw["lora_alpha_ratio"] = float(lora["alpha"]) / (present.pop() if present else 1)
            elif "alpha_ratio" in lora:
                kw["lora_alpha_ratio"] = float(lora["alpha_ratio"])
            kw["lora_dropout"] = float(lora.get("dropout", 0.0))
            kw["lora_rslora"] = bool(lora.get("rslora", False))
            kw["dora"] = bool(lora.get("dora", False))
        for key, size_key, extra in (
            ("serial_adapter", "size", {"position": "serial_position"}),
            ("parallel_adapter", "size", {"scale": "parallel_scale"}),
            ("prefix", "length", {"gate": "prefix_gate"}),
        ):
            sub = d.get(key)
            if sub is None:
                continue
            if not isinstance(sub, Mapping):
                sub = {size_key: sub}
            allowed = {size_key, *extra, *(("activation",) if key != "prefix" else ())}
            _check_keys(sub, allowed, key)
            kw[key] = _per_layer(sub.get(size_key, 0), kw["num_layers"], f"{key}.{size_key}", int)
            for src, dst in extra.items():
                if src in sub:
                    kw[dst] = sub[src]
            if "activation" in sub:
                if activation is not None and activation != sub["activation"]:
                    raise UserError("serial and parallel adapters must share one activation")
                activation = sub["activation"]
        if activation is not None:
            kw["adapter_activation"] = activation
        ia3 = d.get("ia3")
        if ia3:
            if isinstance(ia3, (list, tuple)):  # ia3: [k, v, ffn_out] = those modules in every layer
                ia3 = {m: True for m in ia3}
            _check_keys(ia3, MODULES, "ia3")
            kw["ia3"] = {m: _per_layer(v, kw["num_layers"], f"ia3.{m}", bool) for m, v in ia3.items()}
        if d.get("bitfit") is not None:
            kw["bitfit"] = _per_layer(d["bitfit"], kw["num_layers"], "bitfit", bool)
        return cls(**kw)

    def replace(self, **changes: Any) -> PeftSpec:
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict[str, Any]:
        """One key per setting (`lora.q.3` = rank of LoRA on q in layer 3): MLflow params, tables."""
        out: dict[str, Any] = {"methods": "+".join(self.methods()) or "none"}
        for m, rs in self.lora.items():
            out |= {f"lora.{m}.{i}": r for i, r in enumerate(rs)}
        if self.lora:
            out |= {"lora.alpha_ratio": self.lora_alpha_ratio, "lora.dropout": self.lora_dropout,
                    "lora.rslora": self.lora_rslora, "lora.dora": self.dora}
        for name in ("serial_adapter", "parallel_adapter", "prefix"):
            values = getattr(self, name)
            if any(values):
                out |= {f"{name}.{i}": v for i, v in enumerate(values)}
        for m, bs in self.ia3.items():
            out |= {f"ia3.{m}.{i}": int(b) for i, b in enumerate(bs)}
        if any(self.bitfit):
            out |= {f"bitfit.{i}": int(b) for i, b in enumerate(self.bitfit)}
        return out

    def adapted_layers(self) -> tuple[int, ...]:
        """The layers any method touches, in order. Why: how many layers a configuration adapts is what its
        accuracy, params and memory move with most (the per-layer insertion of AutoPEFT's space), and what a
        study's statistics are grouped by (bench/study_stats.py)."""
        per_layer = [*self.lora.values(), self.serial_adapter, self.parallel_adapter, self.prefix,
                     *self.ia3.values(), self.bitfit]
        return tuple(i for i in range(self.num_layers) if any(i < len(v) and v[i] for v in per_layer))

    def summary(self) -> str:
        """A short human label, e.g. 'lora(q:8,v:8) + serial_adapter(16x6)'."""
        parts = []
        if self.lora:
            def fmt(rs: tuple[int, ...]) -> str:
                nz = {r for r in rs if r}
                layers = sum(1 for r in rs if r)
                core = "/".join(map(str, sorted(nz)))
                return core if layers == self.num_layers else f"{core}@{layers}L"
            name = "dora" if self.dora else "lora"
            parts.append(f"{name}(" + ",".join(f"{m}:{fmt(rs)}" for m, rs in self.lora.items()) + ")")
        for name in ("serial_adapter", "parallel_adapter", "prefix"):
            values = getattr(self, name)
            if any(values):
                nz = sorted({v for v in values if v})
                parts.append(f"{name}({'/'.join(map(str, nz))}@{sum(1 for v in values if v)}L)")
        if self.ia3:
            parts.append("ia3(" + ",".join(self.ia3) + ")")
        if any(self.bitfit):
            parts.append(f"bitfit({sum(self.bitfit)}L)")
        return " + ".join(parts) or "none (head only)"


#: `Fidelity.cuda_graphs` values (the CLI's `--cuda-graphs` choices; here because this module needs no torch)
CUDA_GRAPH_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Fidelity:
    """How hard one trial trains: the knob a search turns down and `--fidelity full` turns up."""

    train_examples: int | None = 4000  # None: the whole train split
    epochs: float = 1.0
    max_steps: int | None = None  # wins over epochs when set
    max_length: int = 128
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float | None = None  # None: the method's default (see train.default_lr)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    seed: int = 0
    #: the training step as a CUDA graph (autopeft.cuda_graphs): "auto" (on CUDA where the model captures,
    #: eager elsewhere), "on" (CUDA only; a capture failure fails the trial) or "off". An execution choice, not
    #: a different training: it changes speed, not what is learnt (padding to bucket lengths is masked out)
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        mode = self.cuda_graphs
        if isinstance(mode, bool):  # YAML 1.1 reads a bare `on` / `off` as a boolean
            object.__setattr__(self, "cuda_graphs", "on" if mode else "off")
        elif mode not in CUDA_GRAPH_MODES:
            raise UserError(f"fidelity.cuda_graphs must be auto, on or off, got {mode!r}")
        if self.train_examples is not None and self.train_examples <= 0:
            raise UserError(f"fidelity.train_examples must be > 0 (or null for all), got {self.train_examples}")
        for name in ("epochs", "max_length", "batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"fidelity.{name} must be > 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"fidelity.max_steps must be > 0, got {self.max_steps}")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"fidelity.lr must be > 0, got {self.lr}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Fidelity:
        d = dict(d or {})
        _check_keys(d, {f.name for f in dataclasses.fields(cls)}, "fidelity")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Metrics:
    """What one trial measured. Every field is a measurement, never an estimate."""

    metric_name: str
    metric: float  # the task metric on the split the trial is scored on
    trainable_params: int
    backbone_params: int
    peak_memory_mb: float
    train_seconds: float
    eval_seconds: float
    tokens_per_s: float
    train_loss: float
    steps: int
    extra: Mapping[str, float] = field(default_factory=dict)  # other metrics of the task (e.g. f1 and acc)
    dev_metric: float | None = None  # the task's dev set, when the trial was scored on a held-out split

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.backbone_params

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra"] = dict(self.extra)
        d["trainable_pct"] = self.trainable_pct
        return d
