"""Which path an op takes: "off" and "auto" on CPU tensors never reach the Triton module, "on" does."""

from __future__ import annotations

import pytest
import torch

from autopeft import kernels
from autopeft.kernels import fused
from tests.kernels.compare import cpu_only

OPS = ["lora_linear", "lora_linear_multi", "dora_linear", "bottleneck_adapter", "ia3_linear"]


def _args(name: str) -> list:
    x, w, b, A, B = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6), torch.randn(2, 8), torch.randn(6, 2)
    return {
        "lora_linear": [x, w, b, A, B, 1.0],
        "lora_linear_multi": [x, [w], [b], [A], [B], [1.0]],
        "dora_linear": [x, w, b, A, B, torch.rand(6) + 0.5, 1.0],
        "bottleneck_adapter": [x, torch.randn(3, 8), torch.randn(3), torch.randn(8, 3), torch.randn(8)],
        "ia3_linear": [x, w, b, torch.randn(6)],
    }[name]


@pytest.fixture
def fused_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Triton path was taken")

    for name in OPS:
        monkeypatch.setattr(fused, name, boom)


@cpu_only
@pytest.mark.parametrize("mode", ["off", "auto"])
@pytest.mark.parametrize("name", OPS)
def test_cpu_modes_use_reference(mode: str, name: str, fused_raises: None) -> None:
    kernels.set_kernels(mode)
    args = _args(name)
    got = getattr(kernels, name)(*args)
    want = getattr(kernels.reference, name)(*args)
    for g, r in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("name", OPS)
def test_on_uses_triton(name: str, fused_raises: None) -> None:
    kernels.set_kernels("on")
    with pytest.raises(AssertionError, match="Triton path"):
        getattr(kernels, name)(*_args(name))


def test_unknown_mode() -> None:
    with pytest.raises(ValueError):
        kernels.set_kernels("fast")


@cpu_only
@pytest.mark.parametrize(("name", "module", "args"), [
    ("scale_rows", "fused", lambda: [torch.randn(1, 5, 8), torch.randn(1, 8)]),
    ("ia3_linear", "ia3_fold", lambda: _args("ia3_linear")),
    ("lora_linear", "lora_fold", lambda: _args("lora_linear")),
    ("lora_linear_multi", "lora_fold", lambda: _args("lora_linear_multi")),
    ("bottleneck_adapter", "accumulate", lambda: _args("bottleneck_adapter"))])
def test_auto_on_a_gpu_takes_the_graph_paths_only_in_a_graphed_step(name: str, module: str, args,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Eagerly every op is the reference (Triton launches and Python autograd functions cost host time, and
    an eager encoder step is host-bound); in a step captured as a CUDA graph, "auto" takes the measured winners."""
    import importlib

    taken = []
    mod = importlib.import_module(f"autopeft.kernels.{module}")
    monkeypatch.setattr(mod, name, lambda *a, **k: taken.append(name) or getattr(kernels.reference, name)(*a, **k))
    monkeypatch.setattr(kernels, "_on_gpu", lambda x: True)  # a CPU tensor standing in for a CUDA one
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    kernels.set_kernels("auto")
    getattr(kernels, name)(*args())
    assert taken == []
    with kernels.graphed():
        getattr(kernels, name)(*args())
    assert taken == [name]
    getattr(kernels, name)(*args())  # the context is left: eager again
    assert taken == [name]


@cpu_only
def test_without_the_fold_graphed_ia3_takes_scale_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTO_FOLD emptied (bench/kernels.py's side-by-side arm), a graphed IA3 runs as before the fold."""
    from autopeft.kernels import ia3_fold, rowscale

    taken = []
    monkeypatch.setattr(rowscale, "ia3_linear", lambda *a, **k: taken.append("rowscale"))
    monkeypatch.setattr(ia3_fold, "ia3_linear", lambda *a, **k: taken.append("fold"))
    monkeypatch.setattr(kernels, "_on_gpu", lambda x: True)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(kernels, "AUTO_FOLD", {})
    kernels.set_kernels("auto")
    with kernels.graphed():
        kernels.ia3_linear(*_args("ia3_linear"))
    assert taken == ["rowscale"]
