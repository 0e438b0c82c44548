"""The per-step cast of a model's adapter tensors (`autopeft.kernels.casts`, installed by `inject`): the same
numbers as casting at each use, in one cast each way instead of two per tensor, and never a stale cast."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from autopeft.kernels import casts
from autopeft.peft import inject
from autopeft.spec import PeftSpec
from tests.conftest import tiny_model

#: every method whose tensors the ops cast: LoRA (shared q/k/v input), IA3 on both sides, both adapters, a prefix
SPEC = {"lora": {"rank": {"q": 2, "k": 2, "v": 2, "o": 2, "ffn_in": 2}}, "ia3": ["ffn_out"],
        "serial_adapter": {"size": 4}, "parallel_adapter": {"size": 4}, "prefix": {"length": 3}}


def _bf16_model(spec: dict, family: str = "bert") -> torch.nn.Module:
    """A bf16 backbone with fp32 adapters (`inject` makes them fp32), as on a GPU: there, the casts happen."""
    model = tiny_model(family, layers=2).to(torch.bfloat16)
    inject(model, PeftSpec.from_dict(spec, num_layers=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "autopeft_" in name:
                assert p.dtype == torch.float32
                p.normal_(0.0, 0.2)  # away from identity inits, so every gradient is non-trivial
    return model.train()


def _step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    grads = torch.autograd.grad(out.float().square().sum(), params)
    return out, list(grads)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_casting_once_per_step_changes_no_number(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SPEC if family == "bert" else {"lora": {"rank": {"q": 2, "k": 2, "v": 2, "ffn_in": 2}},
                                          "ia3": ["k", "ffn_out"], "serial_adapter": {"size": 4}}
    model = _bf16_model(spec, family)
    ids = torch.randint(5, 1000, (3, 7), generator=torch.Generator().manual_seed(0))
    out, grads = _step(model, ids)
    monkeypatch.setattr(casts, "begin", lambda params, dtype: casts._casts.clear())  # cast at each use
    ref_out, ref_grads = _step(model, ids)
    assert torch.equal(out, ref_out)
    params = [p for p in model.parameters() if p.requires_grad]
    for p, g, r in zip(params, grads, ref_grads, strict=True):
        assert g.dtype == p.dtype and torch.equal(g, r)


def _casts_of_params(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """aten::_to_copy calls on adapter-parameter-sized tensors in one forward + backward."""
    sizes = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _step(model, ids)
    return sum(1 for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
               and tuple(e.input_shapes[0]) in sizes)


def test_one_forward_casts_the_adapters_in_one_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """One cat and one cast each way a step instead of a cast per tensor per use and one back per gradient."""
    model = _bf16_model({"lora": {"rank": {"q": 2, "v": 2, "o": 2}}, "serial_adapter": {"size": 4},
                         "prefix": {"length": 3}})
    ids = torch.randint(5, 1000, (2, 5))
    assert _casts_of_params(model, ids) == 0
    monkeypatch.setattr(casts, "begin", lambda params, dtype: casts._casts.clear())
    assert _casts_of_params(model, ids) >= 2 * (3 * 2 + 2 * 4 + 2 * 2)  # 18 tensors (prefix: key, value per
    # layer), forward and back


def test_a_cast_never_outlives_its_forward() -> None:
    """After an optimizer step the next forward reads the moved parameters, and no-grad forwards (evaluation)
    and a failing forward leave nothing behind."""
    model = _bf16_model({"lora": {"rank": {"q": 2, "v": 2}}})
    ids = torch.randint(5, 1000, (2, 5))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(input_ids=ids).logits
    assert not casts._casts
    out.float().sum().backward()
    opt.step()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not casts._casts and not torch.equal(after, out.detach())
    with torch.enable_grad(), pytest.raises(IndexError):
        model(input_ids=ids + 10**6)  # raises in the embedding, after the casts were made
    assert not casts._casts


def test_a_copy_of_the_model_uses_its_own_parameters() -> None:
    """deepcopy copies the hook, whose parameters are the original's: the copy must not read their casts."""
    model = _bf16_model({"lora": {"rank": {"q": 2, "v": 2}}})
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        if p.requires_grad:
            p.data.add_(1.0)
    ids = torch.randint(5, 1000, (2, 5))
    a, _ = _step(twin, ids)
    model_grads = _step(model, ids)
    assert not torch.equal(a, model_grads[0])
    with torch.no_grad():
        assert torch.equal(a, twin(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)


def test_every_cast_starts_aligned() -> None:
    """Each cast is a view into one buffer; a GPU kernel may assume an aligned pointer (SDPA's backward through a
    prefix cast at an unaligned offset gave other gradients on an H200), so each starts at a multiple of
    `casts.ALIGN`."""
    model = _bf16_model({"lora": {"rank": {"q": 3}}, "ia3": ["k"], "prefix": {"length": 3}})
    seen = {}
    begin = casts.begin

    def spy(params, dtype):
        begin(params, dtype)
        seen.update(casts._casts)

    casts_begin = pytest.MonkeyPatch()
    casts_begin.setattr(casts, "begin", spy)
    try:
        _step(model, torch.randint(5, 1000, (2, 5)))
    finally:
        casts_begin.undo()
    assert len(seen) == sum(1 for n, _ in model.named_parameters() if "autopeft_" in n)
    assert all(c.storage_offset() % casts.ALIGN == 0 for c in seen.values())


def test_the_gpu_check_script_finds_no_difference_on_cpu(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """bench/profile/step_casts_check.py, the check to run on a GPU, exits 0 where the paths agree bitwise."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench" / "profile"))
    from step_casts_check import main

    monkeypatch.setattr(sys, "argv", ["step_casts_check.py", "--device", "cpu"])
    assert main() == 0
    out = capsys.readouterr().out
    assert "largest relative error: 0.00e+00" in out and ("autopeft_prefix" in out)


def _adds(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[int, ...]]:
    """The shapes aten::add_ ran on in one forward + backward that accumulates into `.grad`."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        out.float().square().sum().backward()
    return [tuple(e.input_shapes[0]) for e in prof.events() if e.name == "aten::add_" and e.input_shapes]


def test_shared_gradients_add_in_one_go_to_the_same_numbers() -> None:
    """`.grad`s made by `share_gradients` (a graphed step's static gradients): the cast's backward adds every
    adapter gradient into their one buffer in one add, not one per parameter, and they come out as autograd's
    own, accumulating over steps; set to None, autograd makes them as before."""
    model = _bf16_model(SPEC)
    params = [p for p in model.parameters() if p.requires_grad]
    adapters = [p for p in params if p.dtype == torch.float32]
    assert len(adapters) > 10 and len(adapters) < len(params)  # the bf16 head stays outside the buffer
    ids = torch.randint(5, 1000, (3, 7), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().square().sum().backward()
    ref = [p.grad.clone() for p in adapters]

    for p in params:
        p.grad = None
    buf = casts.share_gradients(adapters)
    grads = [p.grad for p in adapters]
    assert all(g._base is buf for g in grads)
    adds = _adds(model, ids)
    sizes = {tuple(p.shape) for p in adapters}
    assert not [s for s in adds if s in sizes] and adds.count(tuple(buf.shape)) == 1
    assert all(p.grad is g for p, g in zip(adapters, grads, strict=True))
    for p, r in zip(adapters, ref, strict=True):
        assert torch.equal(p.grad, r)
    _adds(model, ids)  # a second step accumulates, as into any .grad
    for p, r in zip(adapters, ref, strict=True):
        assert torch.equal(p.grad, 2 * r)

    for p in params:
        p.grad = None
    assert [s for s in _adds(model, ids) if s in sizes] == []  # fresh .grads: autograd's own, no add
    for p, r in zip(adapters, ref, strict=True):
        assert p.grad._base is not buf and torch.equal(p.grad, r)
