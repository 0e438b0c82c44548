"""The graphed training step (autopeft/cuda_graphs.py): bucket lengths and padding on any machine; capture,
replay, exactness against eager, fallback and memory on a CUDA GPU."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from autopeft.cuda_graphs import GraphedStep, bucket_length, use_cuda_graphs
from autopeft.errors import TrialFailed, UserError
from autopeft.spec import Fidelity, PeftSpec
from autopeft.train import LaggedLoss, collate
from tests.conftest import tiny_config, tiny_model
from tests.test_train import cfg, toy_options

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graph capture")


# ----- any machine ----------------------------------------------------------------------------------------
def test_bucket_lengths_are_few_and_waste_little() -> None:
    assert [bucket_length(n, 128) for n in (1, 31, 32, 33, 64, 65, 100, 128)] == [32, 32, 32, 64, 64, 96, 128, 128]
    assert [bucket_length(n, 512) for n in (129, 256, 257, 300, 449, 512)] == [160, 256, 320, 320, 512, 512]
    assert bucket_length(70, 100) == 96 and bucket_length(99, 100) == 100  # capped at a max_length off the grid
    assert len({bucket_length(n, 128) for n in range(1, 129)}) == 4
    assert len({bucket_length(n, 512) for n in range(1, 513)}) == 12
    for n in range(1, 1025):
        b = bucket_length(n, 1024)
        assert n <= b <= 1024 and b - n < max(32, n / 4), (n, b)
    with pytest.raises(ValueError):
        bucket_length(0, 128)


def test_modes_resolve_per_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_cuda_graphs("auto", cpu) and not use_cuda_graphs("off", cpu)
    assert use_cuda_graphs("auto", cuda) and use_cuda_graphs("on", cuda) and not use_cuda_graphs("off", cuda)
    with pytest.raises(UserError, match="needs a CUDA device"):
        use_cuda_graphs("on", cpu)
    with pytest.raises(UserError, match="auto, on, off"):
        use_cuda_graphs("always", cuda)


def test_fidelity_option() -> None:
    assert Fidelity().cuda_graphs == "auto"
    assert Fidelity.from_dict({"cuda_graphs": False}).cuda_graphs == "off"  # YAML's bare `off`
    assert Fidelity.from_dict({"cuda_graphs": True}).cuda_graphs == "on"
    assert Fidelity.from_dict(Fidelity(cuda_graphs="off").to_dict()) == Fidelity(cuda_graphs="off")
    with pytest.raises(UserError, match=r"fidelity\.cuda_graphs must be auto, on or off"):
        Fidelity(cuda_graphs="sometimes")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_padding_to_a_bucket_changes_no_loss(family: str) -> None:
    """Extra padded positions (mask 0) change neither logits nor the per-example loss: BERT pools [CLS], Llama
    the last non-pad token, and masked keys get exactly zero attention."""
    model = tiny_model(family, layers=2)
    rng = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 1000, (int(n),), generator=rng).tolist() for n in (7, 19, 3, 12)]
    idx = list(range(len(ids)))
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        tight = model(**collate(ids, idx, 0, torch.device("cpu")), labels=labels)
        padded_batch = collate(ids, idx, 0, torch.device("cpu"), width=bucket_length(19, 128))
        padded = model(**padded_batch, labels=labels)
    assert padded_batch["input_ids"].shape == (4, 32) and int(padded_batch["attention_mask"].sum()) == 41
    torch.testing.assert_close(padded.logits, tight.logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded.loss, tight.loss, atol=1e-6, rtol=1e-5)


def test_lagged_loss_hands_back_the_previous_step() -> None:
    reader = LaggedLoss(torch.device("cpu"))
    assert reader.pop() is None
    assert reader.push(0, torch.tensor(1.5)) is None
    assert reader.push(1, torch.tensor(float("nan")))[0] == 0
    step, value = reader.pop()
    assert step == 1 and value != value
    assert reader.pop() is None


def test_cpu_trial_trains_eagerly_under_auto(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from autopeft.train import run_trial

    data = toy_options(tmp_path, 64, 16)
    m = run_trial(cfg(tiny_backbone_dir, data, {"lora": {"rank": {"q": 2}}}, max_steps=2), device="cpu",
                  progress=False).metrics
    assert m.steps == 2 and "cuda_graphs" not in m.extra  # nothing to say off CUDA
    with pytest.raises(UserError, match="needs a CUDA device"):
        run_trial(cfg(tiny_backbone_dir, data, {"lora": {"rank": {"q": 2}}}, max_steps=2, cuda_graphs="on"),
                  device="cpu", progress=False)


# ----- CUDA -------------------------------------------------------------------------------------------------
SPECS = {
    "lora_all": {"lora": {"rank": dict.fromkeys(("q", "k", "v", "o", "ffn_in", "ffn_out"), 4)}},
    "adapters": {"serial_adapter": {"size": 8}, "parallel_adapter": {"size": 8}},
    "ia3": {"ia3": ["k", "v", "ffn_out"]},
    "prefix_gated": {"prefix": {"length": 3, "gate": True}},
    "prefix_bitfit": {"prefix": {"length": 3, "gate": False}, "bitfit": True},
    "dora_ia3": {"lora": {"rank": {"q": 4, "v": 4}, "dora": True}, "ia3": ["ffn_in"]},
}


def _model(spec: dict, *, dropout: float = 0.0, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    from autopeft.peft import inject

    c = tiny_config("bert", layers=layers)
    c.hidden_size, c.intermediate_size = hidden, 2 * hidden
    c.hidden_dropout_prob = c.attention_probs_dropout_prob = dropout
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(c, attn_implementation="sdpa")
    if dropout and "lora" in spec:
        spec = {**spec, "lora": {**spec["lora"], "dropout": dropout}}
    inject(model, PeftSpec.from_dict(spec, num_layers=layers))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model.cuda().train()


def _batches(sizes: list[tuple[int, int]], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of (rows, width); every batch has padding, so eager and captured runs take the same
    masked attention path (transformers skips an all-ones mask in eager mode only)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, width in sizes:
        lengths = torch.randint(2, width, (rows,), generator=g)
        ids = [torch.randint(5, 1000, (int(n),), generator=g).tolist() for n in lengths]
        batch = collate(ids, list(range(rows)), 0, torch.device("cuda"), width=width)
        batch["labels"] = torch.randint(0, 2, (rows,), generator=g).cuda()
        out.append(batch)
    return out


def _forward_backward(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The step a GraphedStep wraps: the batch's loss, back-propagated into the trainables' .grad."""
    def forward_backward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = model(**batch).loss
        loss.backward()
        return loss

    return forward_backward


def _train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], graphed: bool
           ) -> tuple[list[float], GraphedStep | None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)

    forward_backward = _forward_backward(model)

    step = GraphedStep(forward_backward, params) if graphed else None
    losses = []
    for batch in batches:
        loss = step(batch) if step is not None else forward_backward(batch)
        losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step is not None:
            step.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)
    return losses, step


@pytest.fixture
def fp32_matmul():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@needs_cuda
@pytest.mark.parametrize("name", list(SPECS))
def test_graphed_steps_equal_eager_steps(name: str, fp32_matmul: None) -> None:
    """Same seed, same batches (two shapes, interleaved): the same losses and trained weights in fp32."""
    batches = _batches([(8, 32), (8, 32), (8, 64), (8, 32), (8, 64), (8, 64)])
    eager_model, graph_model = _model(SPECS[name]), _model(SPECS[name])
    eager, _ = _train(eager_model, batches, graphed=False)
    graphed, step = _train(graph_model, batches, graphed=True)
    assert step is not None and step.failure is None, step.failure
    assert (step.captures, step.replays) == (2, 4)  # one capture per shape; the first batch of each is eager
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    trained = dict(graph_model.named_parameters())
    for n, p in eager_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[n], p, rtol=1e-4, atol=1e-5, msg=n)


@needs_cuda
def test_a_new_shape_is_captured_once_then_replayed() -> None:
    model = _model(SPECS["lora_all"])
    params = [p for p in model.parameters() if p.requires_grad]

    forward_backward = _forward_backward(model)

    step = GraphedStep(forward_backward, params)
    grads = [p.grad for p in params]
    seen = []
    for batch in _batches([(4, 32), (4, 32), (4, 96), (4, 96), (4, 32), (2, 32)]):
        step(batch)
        seen.append((step.captures, step.replays))
        step.zero_grad()
    assert seen == [(1, 0), (1, 1), (2, 1), (2, 2), (2, 3), (3, 3)]
    assert all(p.grad is g for p, g in zip(params, grads))  # static gradients, never replaced
    params[0].grad = None
    with pytest.raises(RuntimeError, match="zero gradients in place"):
        step.zero_grad()


@needs_cuda
def test_warm_up_and_capture_run_in_a_graphed_kernel_context() -> None:
    """`kernels.graphed()` is what lets "auto" take the paths that replay faster: on during the eager warm-up
    (which builds what the capture uses) and the capture, off for the eager fallback and everywhere else."""
    from autopeft import kernels

    model = _model(SPECS["lora_all"])
    params = [p for p in model.parameters() if p.requires_grad]
    inner = _forward_backward(model)
    seen = []

    def forward_backward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.append(kernels._graphed)
        return inner(batch)

    step = GraphedStep(forward_backward, params)
    for batch in _batches([(4, 32), (4, 32)]):
        step(batch)
        step.zero_grad()
    assert seen == [True, True] and not kernels._graphed  # warm-up, capture; the replay runs no Python


@needs_cuda
def test_dropout_runs_and_draws_new_masks_per_replay() -> None:
    model = _model(SPECS["lora_all"], dropout=0.1)
    batches = _batches([(8, 32)] * 6)
    losses, step = _train(model, batches, graphed=True)
    assert step.failure is None and step.replays == 5 and all(torch.isfinite(torch.tensor(losses)))
    params = [p for p in model.parameters() if p.requires_grad]
    a, b = float(step(batches[0])), float(step(batches[0]))  # same batch, same weights: other dropout masks
    step.zero_grad()
    assert a != b and params[0].grad is not None


@needs_cuda
def test_graphed_peak_memory_stays_near_eager() -> None:
    """Peak allocated memory (the search's memory objective) of graphed steps, capture included, vs eager."""
    sizes = [(32, 128), (32, 64), (32, 128), (32, 64), (32, 128)]
    _train(_model(SPECS["ia3"]), _batches([(2, 32)] * 2), graphed=True)  # the side stream's cuBLAS workspace
    peaks = {}
    for graphed in (False, True):
        model = _model(SPECS["lora_all"], hidden=256, layers=4)
        batches = _batches(sizes)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _train(model, batches, graphed=graphed)
        torch.cuda.synchronize()
        peaks[graphed] = torch.cuda.max_memory_allocated()
        del model, batches
        torch.cuda.empty_cache()
    assert peaks[True] <= 1.3 * peaks[False], peaks


@needs_cuda
def test_a_capture_that_syncs_falls_back_to_eager() -> None:
    """A forward that reads a value on the host cannot be captured: the warm-up step still counts, the step
    says why in `failure`, and later steps run eagerly with the same gradients."""
    model = _model(SPECS["ia3"])
    model.classifier.register_forward_hook(lambda m, a, out: out + 0 * out.sum().item())
    params = [p for p in model.parameters() if p.requires_grad]

    forward_backward = _forward_backward(model)

    step = GraphedStep(forward_backward, params)
    batch = _batches([(4, 32)])[0]
    first = step(batch)
    assert step.failure and not step.active and step.captures == 0
    assert torch.isfinite(first) and any(p.grad.abs().sum() > 0 for p in params)
    step.zero_grad()
    again = step(batch)
    torch.testing.assert_close(again, first)
    torch.cuda.synchronize()


# ----- the trainer on CUDA --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_cuda(tmp_path_factory: pytest.TempPathFactory):
    return toy_options(tmp_path_factory.mktemp("toy-cuda"), 400, 64)


@needs_cuda
def test_trainer_graphs_full_batches_and_runs_the_partial_one_eagerly(tiny_backbone_dir: Path, toy_cuda,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """400 examples in batches of 24: 16 full batches through the graphs (bucketed to 32/64 tokens), the last
    16 eagerly; the loss curve matches the eager trainer's up to bf16 rounding (padding is masked out)."""
    from autopeft import train

    calls: list[int] = []

    class Spy(GraphedStep):
        def __call__(self, inputs):
            calls.append(inputs["input_ids"].shape[0])
            assert inputs["input_ids"].shape[1] in (32, 64)
            return super().__call__(inputs)

    monkeypatch.setattr(train, "GraphedStep", Spy)
    spec = {"lora": {"rank": {"q": 4, "v": 4}}, "serial_adapter": 8}
    on = train.run_trial(cfg(tiny_backbone_dir, toy_cuda, spec, batch_size=24, cuda_graphs="on"), progress=False)
    off = train.run_trial(cfg(tiny_backbone_dir, toy_cuda, spec, batch_size=24, cuda_graphs="off"),
                          progress=False)
    assert calls == [24] * 16 and on.metrics.steps == off.metrics.steps == 17
    assert on.metrics.extra["cuda_graphs"] == 1.0 and off.metrics.extra["cuda_graphs"] == 0.0
    torch.testing.assert_close(torch.tensor(on.loss_curve), torch.tensor(off.loss_curve), atol=0.03, rtol=0)
    assert on.metrics.tokens_per_s > 0 and on.metrics.peak_memory_mb > 0


@needs_cuda
def test_trainer_capture_failure_auto_warns_on_fails(tiny_backbone_dir: Path, toy_cuda,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from autopeft import train

    real = train.inject

    def inject_with_a_sync(model, spec, **kw):  # a model whose forward reads a value on the host
        info = real(model, spec, **kw)
        model.classifier.register_forward_hook(lambda m, a, out: out + 0 * out.sum().item())
        return info

    monkeypatch.setattr(train, "inject", inject_with_a_sync)
    monkeypatch.setattr(train, "_GRAPH_WARNINGS", set())
    spec = {"ia3": ["k", "v"]}
    with caplog.at_level(logging.WARNING, logger="autopeft.train"):
        auto = train.run_trial(cfg(tiny_backbone_dir, toy_cuda, spec, max_steps=6, batch_size=16), progress=False)
    assert auto.metrics.extra["cuda_graphs"] == 0.0 and auto.metrics.steps == 6
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(TrialFailed) as err:
        train.run_trial(cfg(tiny_backbone_dir, toy_cuda, spec, max_steps=6, batch_size=16, cuda_graphs="on"),
                        progress=False)
    assert err.value.reason == "cuda_graphs"


@needs_cuda
def test_trainer_nan_fault_is_seen_through_the_graph(tiny_backbone_dir: Path, toy_cuda,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from autopeft import train

    monkeypatch.setenv(train.FAULT_ENV, "nan")
    with pytest.raises(TrialFailed) as err:
        train.run_trial(cfg(tiny_backbone_dir, toy_cuda, {"lora": {"rank": {"q": 2}}}, max_steps=4, batch_size=16,
                            cuda_graphs="on"), progress=False)
    assert err.value.reason == "nan" and "at step 0" in err.value.detail
