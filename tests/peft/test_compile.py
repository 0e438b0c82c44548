"""`torch.compile` of an injected model: one graph for the whole forward (no graph break, no recompile on the
next step), and forward and backward equal to eager.

This is the trainer's default kernel mode ("auto", i.e. the PyTorch reference on CPU and today on CUDA too),
the path a compiled training step runs: a break would split the step into pieces with Python in between,
which is exactly the per-linear host overhead compiling is meant to remove (bench/kernels.py, issue 6).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from autopeft import kernels
from autopeft.peft import inject
from autopeft.peft.linear import PeftLinear
from autopeft.spec import PeftSpec
from tests.conftest import tiny_model

LAYERS = 2
ALL = ("q", "k", "v", "o", "ffn_in", "ffn_out")
# LoRA everywhere (q/k/v and gate/up share x A^T), IA3 on both sides, both adapter kinds around the FFN
SPECS = {
    "lora_ia3_adapters": {"lora": {"rank": dict.fromkeys(ALL, 4)}, "ia3": ["k", "o", "ffn_out"],
                          "serial_adapter": {"size": 4, "position": "houlsby"}, "parallel_adapter": 4},
    "dora_prefix": {"lora": {"rank": {"q": 4, "v": 2}, "dora": True}, "prefix": {"length": 3}},
}


def _pair(family: str, spec: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    models = []
    for _ in range(2):
        model = tiny_model(family, layers=LAYERS)
        inject(model, PeftSpec.from_dict(spec, num_layers=LAYERS))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # non-trivial adapters: B and the up-projections start at zero
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        # HF sets this on the first call with labels, which would recompile the second step
        model.config.problem_type = "single_label_classification"
        models.append(model.train())
    return models[0], models[1]


def _check(family: str, spec: dict, backend: str, rtol: float, atol: float) -> None:
    kernels.set_kernels("auto")
    eager, model = _pair(family, spec)
    if spec["lora"].get("rank", {}).get("k"):  # the q/k/v group's hand-over of kept outputs is traced too
        assert any(isinstance(m, PeftLinear) and m.lora_group is not None for m in model.modules())
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: any break raises
    g = torch.Generator().manual_seed(1)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (eager, model)]
    for _ in range(2):  # the second step runs updated parameters through the same compiled graph
        ids = torch.randint(5, 1000, (3, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        labels = torch.tensor([0, 1, 1])
        outs = []
        for run, m, opt in zip((eager, compiled), (eager, model), opts, strict=True):
            opt.zero_grad(set_to_none=True)
            out = run(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            outs.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=rtol, atol=atol)
        assert outs[1][1].keys() == outs[0][1].keys()
        for name, grad in outs[0][1].items():
            assert grad is not None, name
            torch.testing.assert_close(outs[1][1][name], grad, rtol=rtol, atol=atol, msg=name)
        for opt in opts:
            opt.step()
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: a graph break or a recompile"


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_compiled_forward_has_no_graph_break_and_matches_eager(family: str) -> None:
    """aot_eager traces forward and backward exactly as inductor does (dynamo + AOTAutograd), without the
    minute of C++ codegen, and runs the traced ops as they are: so the tolerance is fp32-tight. The q/k/v
    (and gate/up) groups are on: their hand-over of kept outputs is plain Python state that dynamo folds."""
    _check(family, SPECS["lora_ia3_adapters"], "aot_eager", rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_inductor_matches_eager(family: str, spec: str) -> None:
    """The real compiler (fused kernels, reordered reductions): equal to eager up to fp32 rounding."""
    _check(family, SPECS[spec], "inductor", rtol=1e-4, atol=1e-5)
