"""Kernel tests run the Triton kernels on CPU through Triton's interpreter, against the references in fp64.

`TRITON_INTERPRET` must be set before triton is first imported, hence here and not in a fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernels are Triton kernels: `pip install triton` to test them")

from autopeft import kernels


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
