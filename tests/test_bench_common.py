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


def test_a_gpu_profile_counts_each_kernel_once() -> None:
    """The aten op that launches a kernel carries the kernel's time as its own device time; only the
    device-side event may count, or "busy" doubles (it did in the first GPU profiles)."""
    from common import device_rows, summarize_profile
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    def event(i: int, name: str, start: int, end: int, device: DeviceType) -> FunctionEvent:
        return FunctionEvent(id=i, name=name, thread=0, start_us=start, end_us=end, device_type=device)

    events = [event(0, "aten::mm", 0, 50, DeviceType.CPU),  # the launch, on the host
              event(1, "nvjet_sm90_tst_256x128", 10, 310, DeviceType.CUDA),  # the GEMM it launched, 300 µs
              event(2, "aten::mm", 60, 90, DeviceType.CPU),
              event(3, "nvjet_sm90_tst_256x128", 320, 620, DeviceType.CUDA),
              event(4, "direct_copy_kernel_cuda", 700, 800, DeviceType.CUDA)]
    # a record_function range (the optimizer's) shows on the GPU timeline too, spanning kernels already counted
    events.append(FunctionEvent(id=5, name="Optimizer.step#AdamW.step", thread=0, start_us=0, end_us=800,
                                device_type=DeviceType.CUDA, is_user_annotation=True))
    rows = device_rows(events)
    assert sorted(rows) == [("direct_copy_kernel_cuda", 100.0, 1), ("nvjet_sm90_tst_256x128", 600.0, 2)]
    prof = summarize_profile(rows, steps=2)
    assert prof["busy_ms"] == pytest.approx(0.35)  # (600 + 100) µs over 2 steps
    assert prof["gemm_ms"] == pytest.approx(0.3) and prof["copy_cast_ms"] == pytest.approx(0.05)
    assert prof["top"][0] == {"name": "nvjet_sm90_tst_256x128", "ms": 0.3, "calls": 1.0, "category": "gemm"}


def test_the_device_span_shows_the_time_between_kernels() -> None:
    """Busy 0.35 ms of a 0.4 ms span per step: what a graph's replay loses between its kernels is span - busy."""
    from common import device_span, format_profile, summarize_profile
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    events = [FunctionEvent(id=i, name=n, thread=0, start_us=a, end_us=b, device_type=d) for i, (n, a, b, d) in
              enumerate([("aten::mm", 0, 50, DeviceType.CPU), ("nvjet_sm90_tst", 10, 310, DeviceType.CUDA),
                         ("nvjet_sm90_tst", 320, 620, DeviceType.CUDA), ("direct_copy", 700, 810, DeviceType.CUDA)])]
    span = device_span(events, steps=2)
    assert span == {"span_ms": pytest.approx(0.4), "kernels_per_step": 1.5}
    assert device_span(events[:1], steps=2) == {"span_ms": 0.0, "kernels_per_step": 0.0}  # a replay the profiler hid
    line = format_profile(summarize_profile([("nvjet_sm90_tst", 600.0, 2)], steps=2) | span)
    assert "busy 0.3 ms/step of a 0.4 ms span, 2 kernels" in line and "span" not in line.split(":")[-1]
