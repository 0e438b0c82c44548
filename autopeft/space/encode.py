"""A search space as Optuna distributions, and the two-way map between a trial's params and a `PeftSpec`.

Encoding, and why:

* Fixed-dimensional: every parameter exists in every trial and 0 means "off". BoTorch's sampler only models
  the intersection of all trials' spaces, so a conditional parameter would silently fall back to random.
* Ladders of numbers (ranks, sizes, lengths, alpha ratios) are `IntDistribution(0, n-1)` over the index of
  the sorted choice list. A `CategoricalDistribution` would be one-hot encoded by BoTorch: 8 ranks x 6
  modules is 48 dimensions instead of 6, and the GP would lose the order (rank 8 is between 4 and 16). The
  shipped ladders are geometric, so the index is roughly log(size): the scale on which a size's effect is
  smooth. Optuna's transform relaxes an index to a continuous interval and rounds the optimum back, which
  TPE, NSGA-II and random sampling handle natively too.
* Booleans (DoRA, IA3 per module, BitFit, the per-layer insertion bits) are `IntDistribution(0, 1)`: one
  dimension each, where a categorical would take two.
* Strings (serial position, activation) are nominal, so they stay categorical; spaces rarely search them.
* A list of one value is fixed: no parameter (a single-valued distribution carries no information and
  BoTorch drops it anyway).

Aliasing, and why `encode(decode(p)) == p` holds only for canonical points: when no per-layer method is
switched on anywhere (every insertion bit 0, or every gated size 0), the spec is the same whatever the other
gated settings say, so those settings cannot be read back. `encode` then returns the canonical point (all
bits 0, every gated setting at its smallest choice). Everywhere else the map is a bijection, and always
`decode(encode(s)) == s` for specs in the space (`encode` raises `UserError` for specs outside it).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from autopeft.errors import UserError
from autopeft.space.schema import Setting, SpaceDef, parse_space
from autopeft.spec import PeftSpec
from autopeft.yamlio import load_yaml

#: The shipped spaces: `--space NAME` looks here.
SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def layer_param(i: int, num_layers: int) -> str:
    """`layer.07`: zero-padded so the parameters sort in layer order in every table."""
    return f"layer.{i:0{len(str(max(0, num_layers - 1)))}d}"


class SearchSpace:
    """A validated space; see the module docstring for the encoding."""

    def __init__(self, definition: SpaceDef) -> None:
        self.definition = definition
        self.name = definition.name
        self.description = definition.description
        self.settings: tuple[Setting, ...] = definition.settings
        self.searches_layers = definition.layers == "search"

    # ----- construction ------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path) -> SearchSpace:
        """A shipped space by name (`mixed`) or any YAML file by path."""
        text = str(name_or_path)
        path = Path(text).expanduser()
        looks_like_path = path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text
        if not looks_like_path:
            path = SPACES_DIR / f"{text}.yaml"
            if not path.is_file():
                known = ", ".join(available_spaces()) or "none"
                raise UserError(f"unknown search space {text!r}; available: {known} (or give a path to a YAML file)")
        return cls.from_dict(load_yaml(path, "search space"), source=path)

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = "<dict>") -> SearchSpace:
        return cls(parse_space(data, source))

    # ----- the distributions ---------------------------------------------------------------------------
    def distributions(self, num_layers: int) -> dict[str, BaseDistribution]:
        _check_layers(num_layers)
        out: dict[str, BaseDistribution] = {}
        for s in self.settings:
            if not s.searched:
                continue
            if s.leaf.kind == "enum":
                out[s.param] = CategoricalDistribution(list(s.choices))
            else:
                out[s.param] = IntDistribution(0, len(s.choices) - 1)
        if self.searches_layers:
            for i in range(num_layers):
                out[layer_param(i, num_layers)] = IntDistribution(0, 1)
        return out

    def random_params(self, rng: random.Random, num_layers: int) -> dict[str, Any]:
        """A uniform point drawn only from `rng`, so seeded start points are reproducible anywhere."""
        out: dict[str, Any] = {}
        for name, d in self.distributions(num_layers).items():
            if isinstance(d, IntDistribution):
                out[name] = rng.randint(d.low, d.high)
            else:
                out[name] = rng.choice(list(d.choices))
        return out

    # ----- params <-> spec ---------------------------------------------------------------------------------
    def decode(self, params: Mapping[str, Any], num_layers: int) -> PeftSpec:
        _check_layers(num_layers)
        if self.searches_layers:
            mask = tuple(bool(self._param(params, layer_param(i, num_layers))) for i in range(num_layers))
        else:
            mask = (True,) * num_layers
        kw: dict[str, Any] = {"num_layers": num_layers, "lora": {}, "ia3": {}}
        for s in self.settings:
            value = self._value(s, params)
            field = s.leaf.field
            if s.leaf.gated:
                zero = False if s.leaf.kind == "bool" else 0
                value = tuple(value if on else zero for on in mask)
            if isinstance(field, tuple):
                kw[field[0]][field[1]] = value
            else:
                kw[field] = value
        return PeftSpec(**kw)

    def encode(self, spec: PeftSpec, num_layers: int) -> dict[str, Any]:
        """The params of `spec`; canonical where the spec leaves settings unreadable (module docstring)."""
        _check_layers(num_layers)
        if spec.num_layers != num_layers:
            raise UserError(f"spec is for {spec.num_layers} layers but the backbone has {num_layers}")
        per_layer = {s.key: self._per_layer(spec, s) for s in self.settings if s.leaf.gated}
        if self.searches_layers:
            mask = [any(values[i] for values in per_layer.values()) for i in range(num_layers)]
        else:
            mask = [True] * num_layers
        first_on = mask.index(True) if any(mask) else None
        out: dict[str, Any] = {}
        for s in self.settings:
            if s.leaf.gated:
                value = s.choices[0] if first_on is None else per_layer[s.key][first_on]
            else:
                value = getattr(spec, s.leaf.field)  # type: ignore[arg-type]
            if value not in s.choices:
                raise UserError(f"spec is not in search space {self.name!r}: {s.key} = {value!r} is not among "
                                f"its choices {list(s.choices)}")
            if s.searched:
                out[s.param] = value if s.leaf.kind == "enum" else s.choices.index(value)
        if self.searches_layers:
            out |= {layer_param(i, num_layers): int(on) for i, on in enumerate(mask)}
        if self.decode(out, num_layers) != spec:
            raise UserError(f"spec is not in search space {self.name!r}: {spec.summary()} needs settings the space "
                            "cannot express (sizes that differ between layers, or a method or module it lacks)")
        return out

    # ----- text --------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """What a person needs to judge a space: what is searched, what is fixed, and how big it is."""
        lines = [f"search space {self.name!r} ({self.definition.source})"]
        if self.description:
            lines.append(f"  {self.description}")
        for s in self.settings:
            shown = [_fmt(c) for c in s.choices]
            what = f"one of {', '.join(shown)}" if s.searched else f"fixed at {shown[0]}"
            note = " (per inserted layer)" if s.leaf.gated else ""
            lines.append(f"  {s.key}: {what}{note}")
        if self.searches_layers:
            lines.append("  layers: one on/off bit per layer, shared by every per-layer method")
        else:
            lines.append("  layers: every layer")
        n = sum(s.searched for s in self.settings)
        lines.append(f"  {n} searched settings" + (" + one bit per layer" if self.searches_layers else "")
                     + "; ladders are searched as indices into their sorted choices")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SearchSpace({self.name!r})"

    # ----- helpers -----------------------------------------------------------------------------------------
    def _param(self, params: Mapping[str, Any], name: str) -> Any:
        if name not in params:
            raise UserError(f"trial params lack {name!r}: they come from another search space than {self.name!r}")
        return params[name]

    def _value(self, s: Setting, params: Mapping[str, Any]) -> Any:
        if not s.searched:
            return s.choices[0]
        raw = self._param(params, s.param)
        if s.leaf.kind == "enum":
            if raw not in s.choices:
                raise UserError(f"param {s.param} = {raw!r} is not among {list(s.choices)}")
            return raw
        if isinstance(raw, bool) or int(raw) != raw or not 0 <= int(raw) < len(s.choices):
            raise UserError(f"param {s.param} = {raw!r} is not an index into {list(s.choices)}")
        return s.choices[int(raw)]

    @staticmethod
    def _per_layer(spec: PeftSpec, s: Setting) -> tuple[Any, ...]:
        field = s.leaf.field
        if isinstance(field, tuple):
            zero = False if s.leaf.kind == "bool" else 0
            return getattr(spec, field[0]).get(field[1], (zero,) * spec.num_layers)
        return getattr(spec, field)


def _check_layers(num_layers: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
        raise UserError(f"num_layers must be a positive integer, got {num_layers!r}")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
