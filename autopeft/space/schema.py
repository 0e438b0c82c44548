"""The YAML schema of a search space, checked before anything is built from it.

A space file mirrors the layout of a `PeftSpec` YAML (`lora.rank.q`, `serial_adapter.size`, ...), so a person
reads a space and a spec the same way. The only rule a reader has to learn: every setting is either a
scalar (fixed) or a list (searched over those choices). That keeps the three shipped spaces pure data; a new
space is a new file, never new code.

    name: mixed                 # optional; defaults to the file's stem
    description: ...            # optional, shown by describe()
    layers: search              # one on/off bit per layer gating every per-layer method; `all`: no bits
    lora:
      rank: {q: [0, 4, 8], v: [0, 4, 8]}      # per module type; the same rank in every inserted layer
      alpha_ratio: [1, 2]       # alpha = ratio * rank
      dropout: 0.0
      rslora: false
      dora: [false, true]
    serial_adapter: {size: [0, 8, 16], position: pfeiffer}
    parallel_adapter: {size: [0, 8, 16], scale: 4.0}
    prefix: {length: [0, 4, 8], gate: true}
    ia3: {k: [false, true], v: [false, true], ffn_out: [false, true]}
    bitfit: [false, true]
    adapter_activation: relu

Sizes and ranks are one value shared by every inserted layer (the AutoPEFT paper's design): it keeps the
dimension at (settings + layers) instead of (settings x layers), which is what a GP can learn from in the few
dozen trials a PEFT search affords.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autopeft.errors import UserError
from autopeft.spec import ACTIVATIONS, MODULES, SERIAL_POSITIONS

#: How the layers are searched: one shared insertion bit per layer, or every layer always on.
LAYER_MODES: tuple[str, ...] = ("search", "all")
_META_KEYS = ("name", "description", "layers")


@dataclass(frozen=True)
class Leaf:
    """What one YAML setting may hold and which `PeftSpec` field it fills.

    `field` is the spec attribute, or (attribute, module type) for the per-module maps `lora` and `ia3`.
    `gated` settings are per-layer methods: a layer whose insertion bit is off gets 0 / False there.
    """

    kind: str  # size | positive | fraction | bool | enum
    field: str | tuple[str, str]
    gated: bool = False
    options: tuple[str, ...] = ()


def _template() -> dict[str, Any]:
    return {
        "lora": {
            "rank": {m: Leaf("size", ("lora", m), gated=True) for m in MODULES},
            "alpha_ratio": Leaf("positive", "lora_alpha_ratio"),
            "dropout": Leaf("fraction", "lora_dropout"),
            "rslora": Leaf("bool", "lora_rslora"),
            "dora": Leaf("bool", "dora"),
        },
        "serial_adapter": {
            "size": Leaf("size", "serial_adapter", gated=True),
            "position": Leaf("enum", "serial_position", options=SERIAL_POSITIONS),
        },
        "parallel_adapter": {
            "size": Leaf("size", "parallel_adapter", gated=True),
            "scale": Leaf("positive", "parallel_scale"),
        },
        "prefix": {
            "length": Leaf("size", "prefix", gated=True),
            "gate": Leaf("bool", "prefix_gate"),
        },
        "ia3": {m: Leaf("bool", ("ia3", m), gated=True) for m in MODULES},
        "bitfit": Leaf("bool", "bitfit", gated=True),
        "adapter_activation": Leaf("enum", "adapter_activation", options=ACTIVATIONS),
    }


#: A section that is present must say its size, or it could never switch its method on.
_REQUIRED = {"lora": "rank", "serial_adapter": "size", "parallel_adapter": "size", "prefix": "length"}


@dataclass(frozen=True)
class Setting:
    """One setting of a space: its YAML key, its choices and where it lands in a `PeftSpec`.

    Numbers and booleans are kept sorted ascending, so an index into `choices` is ordinal (see encode.py for
    why the search sees indices). Strings keep the file's order: they are nominal.
    """

    key: str
    leaf: Leaf
    choices: tuple[Any, ...]

    @property
    def searched(self) -> bool:
        return len(self.choices) > 1

    @property
    def param(self) -> str:
        """The Optuna parameter name. Ladders say `.index` so nobody reads an index as a size."""
        return self.key if self.leaf.kind in ("bool", "enum") else f"{self.key}.index"


@dataclass(frozen=True)
class SpaceDef:
    name: str
    description: str
    layers: str
    settings: tuple[Setting, ...]
    source: str


def parse_space(data: Any, source: str | Path) -> SpaceDef:
    """Validate a loaded YAML document; every error names the file and the dotted key to fix."""
    src = str(source)
    if not isinstance(data, Mapping):
        raise UserError(f"search space {src}: expected a mapping of method -> settings, "
                        f"got {type(data).__name__}")
    template = _template()
    _unknown(data, (*_META_KEYS, *template), "", src)
    name = data.get("name", Path(src).stem)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"search space {src}: key name: expected a non-empty string, got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"search space {src}: key description: expected a string, got {description!r}")
    layers = data.get("layers", "all")
    if layers not in LAYER_MODES:
        raise UserError(f"search space {src}: key layers: {layers!r} unknown; use one of {', '.join(LAYER_MODES)}")
    settings: list[Setting] = []
    for section, sub in template.items():
        if section in data:
            _walk(data[section], sub, section, src, settings)
            need = _REQUIRED.get(section)
            if need and (not isinstance(data[section], Mapping) or need not in data[section]):
                raise UserError(f"search space {src}: key {section}.{need} is missing; "
                                f"a {section} section must give its {need} (a list of choices or one value)")
    if not settings:
        raise UserError(f"search space {src}: no settings; give at least one method (lora, serial_adapter, ...)")
    return SpaceDef(name.strip(), description.strip(), layers, tuple(settings), src)


def _unknown(d: Mapping, allowed: Any, prefix: str, src: str) -> None:
    extra = [str(k) for k in d if k not in allowed]
    if extra:
        keys = ", ".join(prefix + k for k in sorted(extra))
        raise UserError(f"search space {src}: unknown key {keys}; known here: {', '.join(map(str, allowed))}")


def _walk(value: Any, node: Any, key: str, src: str, out: list[Setting]) -> None:
    if isinstance(node, Leaf):
        out.append(Setting(key, node, _choices(value, node, key, src)))
        return
    if not isinstance(value, Mapping):
        raise UserError(f"search space {src}: key {key}: expected a mapping with keys {', '.join(node)}, "
                        f"got {value!r}")
    _unknown(value, tuple(node), f"{key}.", src)
    for sub, child in node.items():  # template order, so the parameter order never depends on the file
        if sub in value:
            _walk(value[sub], child, f"{key}.{sub}", src, out)


def _choices(value: Any, leaf: Leaf, key: str, src: str) -> tuple[Any, ...]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise UserError(f"search space {src}: key {key}: an empty list of choices; give at least one value")
    checked = [_check(v, leaf, key, src) for v in items]
    if len(set(checked)) != len(checked):
        raise UserError(f"search space {src}: key {key}: duplicate choices in {items}")
    return tuple(checked) if leaf.kind == "enum" else tuple(sorted(checked))


def _check(v: Any, leaf: Leaf, key: str, src: str) -> Any:
    where = f"search space {src}: key {key}"
    if leaf.kind == "bool":
        if not isinstance(v, bool):
            raise UserError(f"{where}: expected true/false, got {v!r}")
        return v
    if leaf.kind == "enum":
        if v not in leaf.options:
            raise UserError(f"{where}: {v!r} unknown; use one of {', '.join(leaf.options)}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UserError(f"{where}: expected a number, got {v!r}")
    if leaf.kind == "size":
        if int(v) != v or v < 0:
            raise UserError(f"{where}: {v!r} is not a whole number >= 0 (sizes and ranks; 0 means off)")
        return int(v)
    if leaf.kind == "positive" and v <= 0:
        raise UserError(f"{where}: {v!r} must be > 0")
    if leaf.kind == "fraction" and not 0 <= v < 1:
        raise UserError(f"{where}: {v!r} must be in [0, 1)")
    return float(v)
