"""Fused adapter ops (`autopeft.kernels`): Triton kernels on CUDA, their PyTorch references elsewhere.

Every public op has one signature for every path. "off" always uses the reference; "on" insists on Triton
(on CPU this needs `TRITON_INTERPRET=1`, which is how CI tests the kernels); "accumulate" sends LoRA and the
bottleneck adapter to `accumulate` (the reference's GEMMs, their own backward). "auto" (the trainer's default)
picks, per op, the path that measured faster on an H100/H200 (bench/kernels.py, bench/packing_step.py,
bench/results/). Eagerly that is the reference for every op: each Triton launch or Python autograd function
costs host time, and an eager encoder step is bound by the host. Inside a step that is captured as a CUDA graph
(`graphed()`, which `autopeft.cuda_graphs.GraphedStep` wraps around its warm-up and capture) the host time is
paid once, and "auto" takes the paths that replay faster: LoRA and IA3 folded into the frozen weight for the
step (`lora_fold`, `ia3_fold`: the frozen GEMMs then carry the adapter), Triton's `scale_rows` for a pack's
rescalings, and `accumulate`'s bottleneck adapter.
For the GEMM ops: at encoder sizes a step is launch-bound, and our Triton GEMM with the low-rank epilogue
costs more per launch (autotuner wrapper, ~35 arguments) than the cuBLAS calls it replaces, and is 35-60%
slower than cuBLAS on large shapes; the reference instead adds the low-rank term into the base output
with one accumulating cuBLAS GEMM (`addmm`), which removes the scale and add kernels.
`AUTO_TRITON` lists the ops "auto" sends to Triton, so a kernel that wins a measurement is one line away.

The dispatch reads only the mode, the op's name and `x.is_cuda`, and asks for triton once per process, so
`torch.compile` of a model calling these ops traces straight through to the reference's plain PyTorch ops
with no graph break (tests/peft/test_compile.py): on "auto" a compiled step is the reference, fused by
inductor.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable, Container, Iterator
from typing import Any

import torch

from autopeft.kernels import accumulate, reference

MODES = ("auto", "on", "off", "accumulate")
#: ops that "auto" runs through Triton on CUDA in a graphed step: those that beat the reference there in
#: bench/kernels.py or bench/packing_step.py. `scale_rows`: a broadcasting multiply is on PyTorch's
#: non-vectorised elementwise path. Eagerly it lost: a pack's step took 312 against 227 ms
#: (bench/results/packing_step_rowscale-, packing_step_kernels_off-h200-2026-11-30.json)
AUTO_TRITON: frozenset[str] = frozenset({"scale_rows"})
#: ops that "auto" runs on CUDA in a graphed step as the reference's cuBLAS GEMMs with their broadcast
#: rescalings through the Triton `scale_rows` (`rowscale.ia3_linear`), rather than the fused-GEMM kernel "on"
#: runs. Measured on an H200 (bench/results/kernels_rowscale-, kernels-h200-2026-11-30.json): 10% faster in a
#: CUDA graph; slower eager (130 against 122 ms at Llama-1.1B size)
AUTO_SCALE_ROWS: frozenset[str] = frozenset({"ia3_linear"})
#: ops that "auto" runs on CUDA in a graphed step with their adapter folded into the frozen weight, and the
#: module of each: IA3's scales (`ia3_fold`: a pass over the weight instead of over the activations) and LoRA's
#: update (`lora_fold`: the forward and the input gradient are the floor's GEMMs). It takes precedence over
#: AUTO_SCALE_ROWS. bench/kernels.py's `ours_rowscale_ia3_graphed` and `ours_nofold_lora8_all_graphed` arms
#: measure "auto" without it, side by side (bench/results/kernels_fold_all-h200-2026-11-30.json, graphed): IA3 at
#: roberta-large size 15.98 against 17.07 ms (kernels_ia3_fold_all-), LoRA r8 on all linears 20.46 against
#: 23.27 ms, at Llama-1.1B size 132.3 against 141.9 ms
#: `grouped_lora_linear` is a pack's linear site (not dispatched here: `autopeft.packing` asks `folds` and keeps the
#: unfolded path itself): graphed, a pack of 8 at roberta-large size stepped in 142.9 against 170.4 ms unfolded in
#: one call, 124.2 ms with the Triton folds since (bench/results/packing_step_nofold-, packing-h200-2026-11-30.json)
AUTO_FOLD: dict[str, str] = {"ia3_linear": "ia3_fold", "lora_linear": "lora_fold", "lora_linear_multi": "lora_fold",
                             "grouped_lora_linear": "grouped_fold"}
#: the ops `accumulate` implements: the reference's GEMMs with their own backward (LoRA: each input gradient
#: summed in the frozen GEMM's epilogue; the bottleneck adapter: ReLU in the GEMM epilogue, bias gradients as
#: GEMMs). Mode "accumulate" runs them so (any device, eager or not); "auto" runs the ones in AUTO_ACCUMULATE so
#: on CUDA in a graphed step. LoRA is not among them: on an H200 (kernels_accumulate-h200-2026-11-30.json) it
#: saved 2.4 ms of a Llama-1.1B-size step's 127 ms, nothing graphed at roberta-large size. The bottleneck adapter
#: is: graphed at roberta-large size 16.28 against 16.53 ms, while its autograd function makes the eager step
#: 72 against 55 ms (host-bound) (bench/results/kernels_acc_serial-h200-2026-11-30.json)
ACCUMULATE_OPS: frozenset[str] = frozenset({"lora_linear", "lora_linear_multi", "bottleneck_adapter"})
AUTO_ACCUMULATE: frozenset[str] = frozenset({"bottleneck_adapter"})
_mode = "auto"
_graphed = False


def set_kernels(mode: str) -> None:
    """Choose the path for every later op call in this process."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, not {mode!r}")
    if mode == "on" and not triton_available():
        raise RuntimeError("--kernels on needs the triton package (pip install triton)")
    _mode = mode


def kernels_mode() -> str:
    return _mode


@contextlib.contextmanager
def graphed() -> Iterator[None]:
    """The ops called inside belong to a step that is captured as a CUDA graph and replayed (its warm-up
    included, so that it builds what the capture will use), where "auto" picks the paths that replay faster."""
    global _graphed
    before, _graphed = _graphed, True
    try:
        yield
    finally:
        _graphed = before


def _auto_graphed(x: torch.Tensor, name: str, names: Container[str]) -> bool:
    """"auto", in a graphed step on CUDA, for an op in `names`; never while compiling (a compiled step stays
    the reference, whose plain ops inductor fuses itself)."""
    return (_mode == "auto" and _graphed and name in names and _on_gpu(x)
            and not torch.compiler.is_compiling())


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


@functools.cache
def triton_available() -> bool:
    """Cached: a module search per op call is host time on every layer, and dynamo cannot trace it."""
    return importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor, name: str) -> bool:
    if _mode == "off":
        return False
    if _mode == "on":
        return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return _auto_graphed(x, name, AUTO_TRITON) and triton_available()


def _use_scale_rows(x: torch.Tensor, name: str) -> bool:
    return _auto_graphed(x, name, AUTO_SCALE_ROWS) and triton_available()


def _use_fold(x: torch.Tensor, name: str) -> bool:
    return _auto_graphed(x, name, AUTO_FOLD) and triton_available()


def folds(x: torch.Tensor, name: str) -> bool:
    """Whether "auto" folds `name` for `x` here (in AUTO_FOLD, a graphed step on CUDA). For callers that keep the
    unfolded path themselves rather than through `_dispatch`: a pack's grouped linear (`grouped_fold`), whose
    unfolded path is `autopeft.packing.PackedLinear._grouped`."""
    return _use_fold(x, name)


def _use_accumulate(x: torch.Tensor, name: str) -> bool:
    if _mode == "accumulate":
        return name in ACCUMULATE_OPS
    return _auto_graphed(x, name, AUTO_ACCUMULATE)


def _dispatch(name: str) -> Callable[..., Any]:
    ref = getattr(reference, name)

    def op(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _use_triton(x, name):
            from autopeft.kernels import fused  # imported on first use: triton is not needed on CPU

            fn = getattr(fused, name, None)
            if fn is not None:
                return fn(x, *args, **kwargs)
        if _use_fold(x, name):
            module = importlib.import_module(f"autopeft.kernels.{AUTO_FOLD[name]}")
            return getattr(module, name)(x, *args, **kwargs)
        if _use_scale_rows(x, name):
            from autopeft.kernels import rowscale

            return getattr(rowscale, name)(x, *args, **kwargs)
        if _use_accumulate(x, name):
            return getattr(accumulate, name)(x, *args, **kwargs)
        return ref(x, *args, **kwargs)

    op.__name__ = name
    op.__doc__ = ref.__doc__
    return op


lora_linear = _dispatch("lora_linear")
lora_linear_multi = _dispatch("lora_linear_multi")
dora_linear = _dispatch("dora_linear")
bottleneck_adapter = _dispatch("bottleneck_adapter")
ia3_linear = _dispatch("ia3_linear")
scale_rows = _dispatch("scale_rows")

__all__ = ["MODES", "accumulate", "bottleneck_adapter", "dora_linear", "folds", "graphed", "ia3_linear", "kernels_mode",
           "lora_linear", "lora_linear_multi", "reference", "scale_rows", "set_kernels", "triton_available"]
