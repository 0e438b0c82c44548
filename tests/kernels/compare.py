"""Comparison helpers for the kernel tests: fused op vs its reference in fp64, output and every gradient."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from autopeft import kernels

DEVICE = os.environ.get("AUTOPEFT_KERNEL_TEST_DEVICE", "cpu")
cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="asserts what happens to CPU tensors (the reference path)")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _map(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, list | tuple):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, list | tuple):
        return [leaf for i, o in enumerate(obj) for leaf in _leaves(o, f"{prefix}[{i}]")]
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{prefix}.{k}")]
    return []


def check_op(name: str, args: list[Any], kwargs: dict[str, Any], dtype: torch.dtype, seed: int,
             unused_outputs: tuple[int, ...] = (), fn: Callable[..., Any] | None = None) -> None:
    """Run op `name` fused (or `fn`, another implementation of it) and in the fp64 reference; compare the output
    and the gradient of every input that requires one. The reference sees the inputs rounded to `dtype` (what
    the fused op computes with), so the comparison measures the kernel's own error, not the input rounding."""
    fused_out = (fn or getattr(kernels, name))(*args, **kwargs)

    def to_ref(t: torch.Tensor) -> torch.Tensor:
        r = t.detach().to(dtype).double() if t.is_floating_point() else t.detach()
        return r.requires_grad_(t.requires_grad)

    ref_args, ref_kwargs = _map(args, to_ref), _map(kwargs, to_ref)
    ref_out = getattr(kernels.reference, name)(*ref_args, **ref_kwargs)
    outs = list(fused_out) if isinstance(fused_out, list | tuple) else [fused_out]
    refs = list(ref_out) if isinstance(ref_out, list | tuple) else [ref_out]
    tol = TOL[dtype]
    loss = ref_loss = 0
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        assert o.dtype == dtype and o.shape == r.shape, (o.dtype, o.shape, r.shape)
        err = rel_err(o, r)
        assert err <= tol, f"{name} output {i}: rel err {err:.2e} > {tol:g} (seed {seed})"
        if i in unused_outputs:
            continue
        g = torch.randn(r.shape, dtype=torch.float64)
        loss = loss + (o * g.to(o.dtype)).sum()
        ref_loss = ref_loss + (r * g.to(dtype).double()).sum()
    leaves = [(n, t) for n, t in _leaves((args, kwargs)) if t.requires_grad]
    ref_leaves = [(n, t) for n, t in _leaves((ref_args, ref_kwargs)) if t.requires_grad]
    assert leaves, "nothing to differentiate"
    grads = torch.autograd.grad(loss, [t for _, t in leaves], allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, [t for _, t in ref_leaves], allow_unused=True)
    for (n, t), g, rg in zip(leaves, grads, ref_grads, strict=True):
        assert rg is not None, f"{name}: reference has no gradient for {n}"
        assert g is not None, f"{name}: no gradient for {n} (seed {seed})"
        assert g.dtype == t.dtype and g.shape == t.shape, f"{name} grad {n}: {g.dtype} {g.shape} vs {t.dtype} {t.shape}"
        err = rel_err(g, rg)
        assert err <= tol, f"{name} grad of {n}: rel err {err:.2e} > {tol:g} (seed {seed})"


def param(*shape: int, scale: float = 1.0, like: torch.dtype = torch.float32) -> torch.Tensor:
    """A trainable fp32 parameter with random, non-zero values, exactly representable in `like`.

    The reference casts parameters to the activation dtype, the kernels keep biases and scales in fp32 in
    their epilogue; with representable values both see the same number, so a ReLU unit near zero cannot
    switch sides between them and turn a rounding difference into a gradient difference.
    """
    return (torch.randn(*shape) * scale).to(like).float().requires_grad_(True)


def act(*shape: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape).to(dtype).requires_grad_(grad)


def frozen(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype)
