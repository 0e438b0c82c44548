"""Search spaces: fixed-dimensional distributions, params <-> spec round trips, seeded points, bad YAML."""

from __future__ import annotations

import random

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.distributions import IntDistribution

from autopeft.errors import UserError
from autopeft.peft import ModelDims, peft_param_count
from autopeft.space import SearchSpace, available_spaces
from autopeft.spec import PeftSpec

SPACES = ("autopeft", "lora", "mixed")
LAYERS = (1, 2, 6, 12)
DIMS = ModelDims("bert", 6, 384, 1536, 12, 12, 32)


@st.composite
def points(draw: st.DrawFn, space: SearchSpace, num_layers: int) -> dict:
    out = {}
    for name, d in space.distributions(num_layers).items():
        if isinstance(d, IntDistribution):
            out[name] = draw(st.integers(d.low, d.high))
        else:
            out[name] = draw(st.sampled_from(list(d.choices)))
    return out


def has_gated_content(spec: PeftSpec) -> bool:
    return bool(spec.lora or spec.ia3 or any(spec.serial_adapter) or any(spec.parallel_adapter)
                or any(spec.prefix) or any(spec.bitfit))


def test_shipped_spaces_are_listed() -> None:
    assert set(SPACES) <= set(available_spaces())


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("num_layers", LAYERS)
def test_fixed_dimensional(name: str, num_layers: int) -> None:
    space = SearchSpace.load(name)
    dists = space.distributions(num_layers)
    assert dists
    assert all(not d.single() for d in dists.values())  # a single-valued parameter would carry nothing
    assert sum(k.startswith("layer.") for k in dists) == num_layers
    assert list(dists) == list(space.distributions(num_layers))  # stable order: the study's fingerprint


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("num_layers", LAYERS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_round_trip(name: str, num_layers: int, data: st.DataObject) -> None:
    space = SearchSpace.load(name)
    p = data.draw(points(space, num_layers))
    spec = space.decode(p, num_layers)
    assert isinstance(spec, PeftSpec) and spec.num_layers == num_layers
    assert PeftSpec.from_dict(spec.to_dict(), num_layers).to_dict() == spec.to_dict()  # valid and serialisable
    canon = space.encode(spec, num_layers)
    assert space.decode(canon, num_layers) == spec  # decode(encode(s)) == s
    assert space.encode(space.decode(canon, num_layers), num_layers) == canon  # canonical points are fixed points
    if has_gated_content(spec):
        assert canon == p  # a bijection wherever the spec shows every setting
    if num_layers == DIMS.num_layers:
        assert peft_param_count(spec, DIMS) >= 0


@pytest.mark.parametrize("name", SPACES)
def test_random_params_seeded_and_in_distributions(name: str) -> None:
    space = SearchSpace.load(name)
    dists = space.distributions(6)
    a = [space.random_params(random.Random(7), 6) for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(3)
    for _ in range(50):
        p = space.random_params(rng, 6)
        assert set(p) == set(dists)
        for k, v in p.items():
            assert dists[k]._contains(dists[k].to_internal_repr(v))
    assert space.random_params(random.Random(1), 6) != space.random_params(random.Random(2), 6)


def test_autopeft_space_is_the_papers() -> None:
    space = SearchSpace.load("autopeft")
    ladder = (0, 1, 3, 6, 12, 24, 48, 96, 192, 384)
    assert {s.key: s.choices for s in space.settings if s.searched} == {
        "serial_adapter.size": ladder, "parallel_adapter.size": ladder, "prefix.length": ladder}
    p = {**{f"layer.{i}": int(i % 2 == 0) for i in range(6)},
         "serial_adapter.size.index": 4, "parallel_adapter.size.index": 0, "prefix.length.index": 9}
    spec = space.decode(p, 6)
    assert spec.serial_adapter == (12, 0, 12, 0, 12, 0)
    assert spec.prefix == (384, 0, 384, 0, 384, 0)
    assert spec.methods() == ["serial_adapter", "prefix"]


def test_encode_rejects_specs_outside_the_space() -> None:
    space = SearchSpace.load("lora")
    with pytest.raises(UserError, match="not in search space"):
        space.encode(PeftSpec(num_layers=2, lora={"q": (8, 4)}), 2)  # ranks differ between layers
    with pytest.raises(UserError, match=r"not in search space .autopeft.: lora"):
        SearchSpace.load("autopeft").encode(PeftSpec(num_layers=2, lora={"q": (8, 8)}), 2)
    with pytest.raises(UserError, match=r"lora\.rank\.q"):
        space.encode(PeftSpec(num_layers=2, lora={"q": (3, 3)}), 2)  # 3 is not a choice
    assert space.encode(PeftSpec(num_layers=2, lora={"q": (8, 0)}, lora_alpha_ratio=2.0), 2)["layer.1"] == 0


def test_unknown_name_lists_spaces() -> None:
    with pytest.raises(UserError, match=r"available: .*autopeft.*lora.*mixed"):
        SearchSpace.load("nonexistent-space")


def test_describe_and_name() -> None:
    space = SearchSpace.load("mixed")
    assert space.name == "mixed"
    text = space.describe()
    assert "lora.rank.q" in text and "layer" in text


@pytest.mark.parametrize(("doc", "key"), [
    ({"lora": {"rank": {"q": [0, 4]}, "alhpa_ratio": 2}}, "lora.alhpa_ratio"),
    ({"lora": {"rank": {"attn": [0, 4]}}}, "lora.rank.attn"),
    ({"serial_adapter": {"size": [0, -4]}}, "serial_adapter.size"),
    ({"serial_adapter": {"size": [0, 2.5]}}, "serial_adapter.size"),
    ({"serial_adapter": {"size": []}}, "serial_adapter.size"),
    ({"serial_adapter": {"size": [4, 4]}}, "serial_adapter.size"),
    ({"serial_adapter": {"position": "pfeiffer"}}, "serial_adapter.size"),
    ({"serial_adapter": {"size": 8, "position": "middle"}}, "serial_adapter.position"),
    ({"ia3": {"k": [0, 1]}}, "ia3.k"),
    ({"bitfit": "yes"}, "bitfit"),
    ({"lora": {"rank": {"q": 8}, "dropout": 1.5}}, "lora.dropout"),
    ({"lora": {"rank": {"q": 8}, "alpha_ratio": 0}}, "lora.alpha_ratio"),
    ({"prefix": {"length": [0, 4]}, "layers": "some"}, "layers"),
    ({"adapters": {"size": 4}}, "adapters"),
    ({"name": "x"}, "no settings"),
    ([1, 2], "mapping"),
])
def test_bad_yaml_names_file_and_key(tmp_path, doc, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError) as err:
        SearchSpace.load(str(path))
    assert str(path) in str(err.value) and key in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_yaml_syntax_and_missing_file(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("lora: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        SearchSpace.load(str(path))
    with pytest.raises(UserError, match="does not exist"):
        SearchSpace.load(str(tmp_path / "missing.yaml"))


def test_a_user_space_file(tmp_path) -> None:
    path = tmp_path / "mine.yml"
    path.write_text("layers: all\nlora: {rank: {q: [4, 8], v: 8}, dora: true}\nbitfit: [false, true]\n")
    space = SearchSpace.load(str(path))
    assert space.name == "mine"
    assert set(space.distributions(3)) == {"lora.rank.q.index", "bitfit"}
    spec = space.decode({"lora.rank.q.index": 1, "bitfit": 1}, 3)
    assert spec.lora == {"q": (8, 8, 8), "v": (8, 8, 8)} and spec.dora and spec.bitfit == (True,) * 3
    assert space.encode(spec, 3) == {"lora.rank.q.index": 1, "bitfit": 1}
