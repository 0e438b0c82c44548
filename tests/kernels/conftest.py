"""Kernel tests run the Triton kernels on CPU through Triton's interpreter, against the references in fp64.

CI has no GPU, so the interpreter is the default. The same tests run the compiled kernels on a GPU with
`AUTOPEFT_KERNEL_TEST_DEVICE=cuda pytest tests/kernels` (the interpreter does not model a GPU's rounding,
tiling bugs that only show with real block scheduling, or its memory alignment).
`TRITON_INTERPRET` must be set before triton is first imported, hence here and not in a fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from tests.kernels.compare import DEVICE

if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="the fused kernels are Triton kernels: `pip install triton` to test them")

from autopeft import kernels


@pytest.fixture(autouse=True)
def on_device() -> Iterator[None]:
    """Every tensor a test makes lands on the device under test."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


@pytest.fixture(autouse=True)
def kernels_on() -> Iterator[None]:
    before = kernels.kernels_mode()
    kernels.set_kernels("on")
    yield
    kernels.set_kernels(before)


@pytest.fixture
def seed() -> int:
    """Fresh inputs every run (the kernels must hold for any values); the seed is in each failure message."""
    return torch.seed()  # reseeds from OS entropy; torch.manual_seed(<seed>) replays a failure
