"""bench/common.py's step profile: what `--profile` of the bench scripts reports a missed target by."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from common import _category, profile_step


@pytest.mark.parametrize(("name", "category"), [
    ("aten::mm", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", "copy_cast"),
    ("aten::gelu", "other"),
])
def test_kernels_fall_into_the_category_a_reader_expects(name: str, category: str) -> None:
    assert _category(name) == category


def test_profile_splits_a_step_and_names_its_heaviest_ops() -> None:
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x = torch.randn(4096)

    def step() -> None:
        for _ in range(4):
            a @ b  # the heavy part
        torch.nn.functional.gelu(x)

    prof = profile_step(step, steps=2, cuda=False)
    cats = {k: v for k, v in prof.items() if k.endswith("_ms") and k != "busy_ms"}
    assert set(cats) == {"attention_ms", "optimizer_ms", "gemm_ms", "copy_cast_ms", "other_ms"}
    assert prof["busy_ms"] == pytest.approx(sum(cats.values()))
    assert prof["gemm_ms"] > prof["other_ms"] > 0
    top = prof["top"][0]
    assert top["name"] == "aten::mm" and top["calls"] == 4 and top["category"] == "gemm"
