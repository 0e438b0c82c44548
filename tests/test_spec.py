"""PeftSpec: what users write in YAML becomes an explicit, comparable spec, and bad specs are rejected."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autopeft.errors import UserError
from autopeft.spec import MODULES, Fidelity, PeftSpec


def test_scalar_list_and_mapping_forms_expand_per_layer() -> None:
    spec = PeftSpec.from_dict({"lora": {"rank": {"q": 8, "v": [0, 4, 4], "k": {2: 16}}}}, num_layers=3)
    assert spec.lora == {"q": (8, 8, 8), "v": (0, 4, 4), "k": (0, 0, 16)}
    assert spec.methods() == ["lora"]


def test_dora_as_its_own_method_key() -> None:
    spec = PeftSpec.from_dict({"dora": {"rank": {"q": 4}}}, num_layers=2)
    assert spec.dora and spec.methods() == ["dora"]


def test_zero_means_off() -> None:
    spec = PeftSpec.from_dict({"lora": {"rank": {"q": 0}}, "serial_adapter": 0, "ia3": {"k": False}}, num_layers=2)
    assert spec.is_empty() and spec.summary() == "none (head only)"


def test_adapted_layers_are_the_union_over_methods() -> None:
    spec = PeftSpec.from_dict({"lora": {"rank": {"q": {1: 8}}}, "prefix": {"length": {4: 3}},
                               "ia3": {"v": {2: True}}, "bitfit": {1: True}}, num_layers=6)
    assert spec.adapted_layers() == (1, 2, 4)
    assert PeftSpec.from_dict({}, num_layers=6).adapted_layers() == ()
    assert PeftSpec.from_dict({"serial_adapter": 16}, num_layers=3).adapted_layers() == (0, 1, 2)


@pytest.mark.parametrize(("spec", "needle"), [
    ({"lora": {"rank": {"q": -1}}}, "negative"),
    ({"lora": {"rank": {"query": 8}}}, "unknown key"),
    ({"loha": {"rank": 4}}, "unknown method"),
    ({"serial_adapter": {"size": {7: 8}}}, "beyond the model's depth"),
    ({"prefix": [1, 2]}, "3 layers"),
    ({"lora": {"rank": {"q": 2.5}}}, "whole number"),
    ({"serial_adapter": {"size": 8, "position": "middle"}}, "position"),
    ({"lora": {"rank": {"q": 4, "v": 8}, "alpha": 16}}, "alpha_ratio"),
])
def test_bad_specs_name_the_problem(spec: dict, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        PeftSpec.from_dict(spec, num_layers=3)


def test_fidelity_rejects_nonsense() -> None:
    with pytest.raises(UserError, match="batch_size"):
        Fidelity(batch_size=0)
    with pytest.raises(UserError, match="unknown key"):
        Fidelity.from_dict({"epoch": 3})


layers = st.integers(min_value=1, max_value=8)


@st.composite
def specs(draw: st.DrawFn) -> PeftSpec:
    n = draw(layers)
    size = st.lists(st.sampled_from([0, 1, 2, 8, 64]), min_size=n, max_size=n)
    flag = st.lists(st.booleans(), min_size=n, max_size=n)
    return PeftSpec(
        num_layers=n,
        lora={m: tuple(draw(size)) for m in draw(st.sets(st.sampled_from(MODULES)))},
        dora=draw(st.booleans()), lora_alpha_ratio=draw(st.sampled_from([0.5, 1.0, 2.0])),
        serial_adapter=tuple(draw(size)), serial_position=draw(st.sampled_from(["pfeiffer", "houlsby"])),
        parallel_adapter=tuple(draw(size)), prefix=tuple(draw(size)), prefix_gate=draw(st.booleans()),
        ia3={m: tuple(draw(flag)) for m in draw(st.sets(st.sampled_from(MODULES)))},
        bitfit=tuple(draw(flag)),
    )


@given(specs())
def test_to_dict_from_dict_round_trip(spec: PeftSpec) -> None:
    again = PeftSpec.from_dict(spec.to_dict())
    # settings of absent methods are not serialised, so compare what builds the model
    assert again.to_dict() == spec.to_dict()
    assert again.methods() == spec.methods()
    assert again.flat() == spec.flat()
