"""The packed step as CUDA graphs (autopeft/packing.py `_static_steps`).

On any machine: the host logic the graphed path rests on, with `STATIC_WITHOUT_GRAPHS` running it uncaptured:
layouts built once per composition and kept, padding to a bucket length changes no trial's loss, static stack
gradients equal the handed-out ones, a NaN in one trial's loss or parameters reaches no other trial through
the sum-of-losses backward, and the whole static path (bucketed widths, losses read one step late, a new
composition when a trial leaves) trains every trial as the eager pack does.

On a CUDA GPU: graphed packs against eager packs in fp32 (losses rel 1e-5, final weights), for mixed methods,
with a trial leaving mid-way on a NaN, and a capture failure (auto: warning and eager; on: the pack fails).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from autopeft import packing
from autopeft.cuda_graphs import bucket_length
from autopeft.errors import TrialFailed, UserError
from autopeft.packing import PackState, train_pack
from autopeft.peft import trainable_state_dict
from autopeft.train import DataOptions, TrialConfig, TrialResult
from tests.test_packing import TRIALS, assert_same_trial, randomised_trials, toy_pack_data
from tests.test_train import cfg

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graph capture")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> DataOptions:
    return toy_pack_data(tmp_path_factory.mktemp("toy-pack-graphs"))


def _configs(backbone: Path, data: DataOptions, graphs: str = "auto") -> list[TrialConfig]:
    """test_packing's mixed pack: LoRA, DoRA, IA3, BitFit, serial/parallel adapters, prefixes; other seeds,
    batch sizes (16, 8, 12) and step counts (4-7), so trials leave the pack at different steps."""
    return [cfg(backbone, data, spec, lr=5e-3, cuda_graphs=graphs, **fid) for spec, fid in TRIALS]


# ----- any machine: the host logic ----------------------------------------------------------------------------
def test_layouts_are_built_once_per_composition_and_kept() -> None:
    """A graph reads its composition's index tensor by address at every replay: the tensor is built before the
    step and kept (not replaced by another composition's) until the pack is released."""
    state = PackState()
    dev = torch.device("cpu")
    state.segments = [(0, 0, 4), (1, 4, 8), (2, 8, 12)]
    assert state.layout(dev, 3) == (3, None)  # every slot in order: plain batched GEMMs, no index
    state.segments = [(0, 0, 4), (2, 4, 8)]  # slot 1 left the pack
    chunks, idx = state.layout(dev, 3)
    assert chunks == 2 and idx.tolist() == [0, 2]
    state.segments = [(0, 0, 4), (2, 4, 6)]  # a short batch: chunks of gcd(4, 2) rows
    assert state.layout(dev, 3)[1].tolist() == [0, 0, 2]
    state.segments = [(0, 0, 4), (2, 4, 8)]
    assert state.layout(dev, 3)[1] is idx  # the very tensor a graph of this composition captured
    state.release()
    assert state.layout(dev, 3)[1] is not idx


def test_a_layout_built_before_the_step_is_the_one_the_forward_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """`train_pack` builds the layout on its device "cuda" (no index), the packed modules ask with `x.device`,
    "cuda:0": one key, so the forward finds the tensor built outside the capture instead of building its own."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    state = PackState()
    state.segments = [(0, 0, 4), (1, 4, 8)]
    before = state.layout(torch.device("cuda"), 2)
    assert state.layout(torch.device("cuda", 0), 2) is before and len(state._layouts) == 1


def test_the_uncaptured_step_refuses_replaced_gradients() -> None:
    """`STATIC_WITHOUT_GRAPHS` checks what `GraphedStep` checks: the .grad tensors it was given stay put."""
    p = torch.nn.Parameter(torch.ones(3))
    step = packing._UncapturedStep(lambda inputs: (p * inputs["x"]).sum(), [p])
    step({"x": torch.ones(3)})
    p.grad = torch.zeros(3)
    with pytest.raises(RuntimeError, match="replaced"):
        step({"x": torch.ones(3)})


def test_collate_pads_every_trial_to_the_bucket() -> None:
    trials = [SimpleNamespace(slot=0, train_ids=[[5, 6, 7], [5, 6]]), SimpleNamespace(slot=2, train_ids=[[9] * 19])]
    batches = [(trials[0], [0, 1]), (trials[1], [0])]
    ids, mask, segments = packing._collate_pack(batches, 0, bucket_length(19, 128))
    assert ids.shape == mask.shape == (3, 32) and mask.sum(1).tolist() == [3, 2, 19]
    assert segments == [(0, 0, 2), (2, 2, 3)]
    assert packing._collate_pack(batches, 0)[0].shape == (3, 19)


def _tiny_pack(family: str = "bert"):
    """A packed tiny model of FORWARD_SPECS' trials (every method), adapters randomised away from identity."""
    from autopeft.packing import build_packed_model

    base, models, specs = randomised_trials(family)
    models = [m.train() for m in models]
    state = build_packed_model(base, models, specs)
    assert state.stack() > 0
    base.train()
    return base, state, models


def _batch(state: PackState, sizes: list[int], width: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(5, 1000, (int(n),), generator=gen).tolist()
            for n in torch.randint(3, 10, (sum(sizes),), generator=gen)]
    owners, start = [], 0
    for k, n in enumerate(sizes):
        if n:
            owners.append((SimpleNamespace(slot=k, train_ids=rows[start:start + n]), list(range(n))))
        start += n
    ids, mask, segments = packing._collate_pack(owners, 0, width)
    labels = torch.randint(0, 2, (ids.shape[0],), generator=gen)
    state.segments = segments
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trials(n: int, nan: int | None = None) -> list[SimpleNamespace]:
    return [SimpleNamespace(fault="nan" if k == nan else None) for k in range(n)]


def test_padding_to_a_bucket_changes_no_trials_loss() -> None:
    base, state, models = _tiny_pack()
    fn = packing._static_step_fn(base, state, _trials(len(models)), packing._null())
    tight = fn(_batch(state, [2, 3, 1, 2, 3, 1]))
    tight_grads = [p.grad.clone() for m in models for p in m.parameters() if p.requires_grad]
    for m in models:
        m.zero_grad(set_to_none=True)
    padded = fn(_batch(state, [2, 3, 1, 2, 3, 1], width=32))
    assert state.segments[-1][2] == 12
    torch.testing.assert_close(padded, tight, rtol=1e-5, atol=1e-6)
    grads = [p.grad for m in models for p in m.parameters() if p.requires_grad]
    for g, t in zip(grads, tight_grads, strict=True):
        torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-6)


def test_static_gradients_equal_handed_out_gradients_and_stay_put() -> None:
    """`make_static`: the trials' `.grad`s are views of the stacks' static buffers, set once, equal to what the
    eager hooks hand out, zeroed in place between steps; release gives each trial its own storage, no .grad."""
    base, state, models = _tiny_pack()
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    fn = packing._static_step_fn(base, state, _trials(len(models)), packing._null())
    eager = []
    for seed in (0, 1):
        fn(_batch(state, [2] * len(models), seed=seed))
        eager.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    leaves = state.make_static()
    assert leaves and all(leaf.grad is not None for leaf in leaves)
    stacked = state.stacked_params()
    for p in params:
        if p.grad is None:
            assert id(p) not in stacked
            p.grad = torch.zeros_like(p)
    held = [p.grad for p in params]
    # what train_pack zeroes: the whole static buffers (a slot without a term, IA3's ones say, gets a gradient
    # there that is no trial's) and the other parameters' gradients
    static = [leaf.grad for leaf in leaves] + [p.grad for p in params if id(p) not in stacked]
    for seed, expected in zip((0, 1), eager, strict=True):
        fn(_batch(state, [2] * len(models), seed=seed))
        assert all(p.grad is g for p, g in zip(params, held, strict=True))
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
        torch._foreach_zero_(static)
        assert all(g.count_nonzero() == 0 for g in held)
    state.release()
    for p in params:
        if id(p) in stacked:
            assert p.grad is None and p.untyped_storage().nbytes() == p.numel() * p.element_size()
    assert all(leaf.grad is None for leaf in leaves)


@pytest.mark.parametrize("where", ["loss", "params"])
def test_a_nan_in_one_trial_reaches_no_other_trial(where: str) -> None:
    """The graphed backward's root is the sum of every trial's loss, NaN or not. A NaN loss (an injected fault,
    or a trial whose parameters went NaN on its last step) must not reach another trial's gradients through
    the shared frozen path, the stacks or the grouped GEMMs: the others' gradients are exactly those of the
    same step without it, and finite."""
    base, state, models = _tiny_pack()
    n = len(models)
    bad = 1  # DoRA + BitFit LayerNorms: grouped GEMMs, a per-slot norm, a segmented module
    leaves = state.make_static()
    own = [[p for p in m.parameters() if p.requires_grad] for m in models]
    for p in (p for ps in own for p in ps):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    batch = _batch(state, [2] * n)
    fn = packing._static_step_fn(base, state, _trials(n), packing._null())
    clean = fn(dict(batch))
    expected = [[p.grad.clone() for p in ps] for ps in own]
    torch._foreach_zero_([p.grad for ps in own for p in ps] + [leaf.grad for leaf in leaves])
    if where == "params":
        with torch.no_grad():
            for p in own[bad]:
                p.fill_(float("nan"))
        fn_bad = fn
    else:
        fn_bad = packing._static_step_fn(base, state, _trials(n, nan=bad), packing._null())
    dirty = fn_bad(dict(batch))
    assert not torch.isfinite(dirty[bad])
    others = [k for k in range(n) if k != bad]
    torch.testing.assert_close(dirty[others], clean[others], rtol=0, atol=0)
    for k in others:
        for p, e in zip(own[k], expected[k], strict=True):
            assert torch.isfinite(p.grad).all()
            torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7)
    assert any(not torch.isfinite(p.grad).all() for p in own[bad])


def test_cuda_graphs_mode_is_one_per_pack_and_on_needs_cuda(tiny_backbone_dir: Path, toy: DataOptions) -> None:
    configs = _configs(tiny_backbone_dir, toy)
    mixed = [configs[0], dataclasses.replace(configs[1], fidelity=dataclasses.replace(configs[1].fidelity,
                                                                                       cuda_graphs="off"))]
    with pytest.raises(UserError, match="cuda_graphs"):
        train_pack(mixed, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA device"):
            train_pack(_configs(tiny_backbone_dir, toy, "on")[:1], device="cpu")


@pytest.mark.slow
def test_static_path_trains_as_the_eager_pack(tiny_backbone_dir: Path, toy: DataOptions,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The graphed path's host logic, uncaptured (on the CPU, also on a GPU machine), on the mixed pack (trials
    leave at steps 4, 5, 6, 7; batch sizes 16, 8, 12), with one trial diverging for real (NaN caught one step
    late) and one with an injected NaN: the survivors train exactly as in the eager pack, the NaN trials fail
    `nan` at the step it happened. Each change of the active set is a new composition (new captures)."""
    configs = _configs(tiny_backbone_dir, toy)
    task = configs[0].data.load("file")
    eager = train_pack(configs, task=task, memory_probe=False, device="cpu")
    monkeypatch.setattr(packing, "STATIC_WITHOUT_GRAPHS", True)
    static = train_pack(configs, task=task, memory_probe=False, device="cpu")
    assert static.stats.steps == eager.stats.steps == 7
    assert static.stats.graph_captures >= 4 and static.stats.graph_replays > 0  # 4 compositions at least
    assert static.stats.graph_captures + static.stats.graph_replays + static.stats.graph_steps_eager == 7
    assert static.stats.cuda_graphs == 0 and eager.stats.graph_captures == 0  # on CPU: nothing was captured
    assert static.stats.tokens == eager.stats.tokens
    for s, e in zip(static.results, eager.results, strict=True):
        assert isinstance(s, TrialResult), s
        assert_same_trial(s, e)
        assert "cuda_graphs" not in s.metrics.extra

    diverging = dataclasses.replace(configs[1], fidelity=dataclasses.replace(configs[1].fidelity, lr=1e36))
    chosen = [configs[0], diverging, configs[2], configs[3]]
    monkeypatch.setenv("AUTOPEFT_INJECT_FAULT", "nan@12")
    nan_static = train_pack(chosen, task=task, trial_numbers=[10, 11, 12, 13], memory_probe=False,
                            device="cpu")
    monkeypatch.setattr(packing, "STATIC_WITHOUT_GRAPHS", False)
    nan_eager = train_pack(chosen, task=task, trial_numbers=[10, 11, 12, 13], memory_probe=False,
                           device="cpu")
    for k in (1, 2):
        assert isinstance(nan_static.results[k], TrialFailed) and nan_static.results[k].reason == "nan"
        assert nan_static.results[k].detail == nan_eager.results[k].detail
    assert "step 0" in nan_static.results[2].detail
    for k in (0, 3):
        assert isinstance(nan_static.results[k], TrialResult), nan_static.results[k]
        assert_same_trial(nan_static.results[k], nan_eager.results[k])
        assert_same_trial(nan_static.results[k], static.results[k])  # as if the NaN trials were never there


def test_a_failed_capture_under_on_keeps_the_finished_trials_last_loss(
        tiny_backbone_dir: Path, toy: DataOptions, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under "on", a capture that fails on a later composition (after a trial finished and left) fails the
    trials still in the pack; the one that finished keeps every step's loss, the last one read one step late
    (still queued when the capture failed). On the CPU: the uncaptured step, made to fail on its second
    composition, and "on" let through."""
    made = []

    class FailsOnSecondComposition(packing._UncapturedStep):
        def __init__(self, fn, params):
            super().__init__(fn, params)
            made.append(self)

        def __call__(self, inputs):
            losses = super().__call__(inputs)
            if len(made) > 1:
                self.failure = "RuntimeError: simulated capture failure"
            return losses

    monkeypatch.setattr(packing, "STATIC_WITHOUT_GRAPHS", True)
    monkeypatch.setattr(packing, "use_cuda_graphs", lambda mode, dev: False)
    monkeypatch.setattr(packing, "_UncapturedStep", FailsOnSecondComposition)
    configs = _configs(tiny_backbone_dir, toy, "on")
    pack = train_pack([configs[0], configs[4]], memory_probe=False, device="cpu")  # 6 and 4 steps
    assert len(made) == 2 and pack.stats.graph_failure
    assert isinstance(pack.results[0], TrialFailed) and pack.results[0].reason == "cuda_graphs"
    done = pack.results[1]
    assert isinstance(done, TrialResult), done
    assert done.metrics.steps == 4 and len(done.loss_curve) == 4


# ----- CUDA -------------------------------------------------------------------------------------------------
@pytest.fixture
def fp32_cuda(monkeypatch: pytest.MonkeyPatch):
    """Packs on CUDA in fp32 without autocast, TF32 off: graphed and eager then agree to rounding."""
    monkeypatch.setattr(packing, "CUDA_BF16", False)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def assert_same_weights(a: TrialResult, b: TrialResult) -> None:
    wa, wb = trainable_state_dict(a.model), trainable_state_dict(b.model)
    assert wa.keys() == wb.keys()
    for name in wb:
        if name.endswith("attention.self.key.bias"):  # a zero gradient in real arithmetic: see test_packing
            continue
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)


def assert_same_losses(a: TrialResult, b: TrialResult) -> None:
    assert len(a.loss_curve) == len(b.loss_curve) == a.metrics.steps == b.metrics.steps
    worst = max(abs(x - y) / abs(y) for x, y in zip(a.loss_curve, b.loss_curve, strict=True))
    assert worst <= 1e-5, (a.spec.summary(), a.loss_curve, b.loss_curve)


@pytest.fixture(scope="module")
def cuda_packs(tiny_backbone_dir: Path, toy: DataOptions):
    """The mixed pack on CUDA in fp32, graphed ("on") and eager ("off"), once for the module."""
    mp = pytest.MonkeyPatch()
    mp.setattr(packing, "CUDA_BF16", False)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        task = toy.load("file")
        graphed = train_pack(_configs(tiny_backbone_dir, toy, "on"), task=task, memory_probe=False)
        eager = train_pack(_configs(tiny_backbone_dir, toy, "off"), task=task, memory_probe=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        mp.undo()
    return graphed, eager


@needs_cuda
def test_graphed_pack_equals_eager_pack(cuda_packs) -> None:
    """Mixed methods (LoRA, DoRA, IA3, BitFit, serial and parallel adapters, prefixes), trials leaving at
    different steps: the same per-trial losses (rel 1e-5) and trained weights, the steps replayed as graphs."""
    graphed, eager = cuda_packs
    assert graphed.stats.cuda_graphs == 1 and graphed.stats.graph_failure is None
    assert graphed.stats.graph_captures >= 4 and graphed.stats.graph_replays > 0
    # every step captured (its warm-up is the step) or replayed: none ran uncaptured (no short batch here)
    assert graphed.stats.graph_captures + graphed.stats.graph_replays == graphed.stats.steps
    assert graphed.stats.graph_steps_eager == 0
    assert eager.stats.cuda_graphs == 0 and eager.stats.graph_captures == 0
    assert graphed.stats.tokens == eager.stats.tokens and graphed.stats.steps == eager.stats.steps
    for g, e in zip(graphed.results, eager.results, strict=True):
        assert isinstance(g, TrialResult) and isinstance(e, TrialResult), (g, e)
        assert g.metrics.extra["cuda_graphs"] == 1.0 and e.metrics.extra["cuda_graphs"] == 0.0
        assert_same_losses(g, e)
        assert_same_weights(g, e)
        assert g.metrics.metric == pytest.approx(e.metrics.metric, abs=1e-9)


@needs_cuda
def test_graphed_pack_nan_trial_leaves_others_as_eager(tiny_backbone_dir: Path, toy: DataOptions, cuda_packs,
                                                       fp32_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """One trial diverges for real, one gets an injected NaN from step 0: they fail `nan` at the step it
    happened (read one step late) and leave the pack; the others train as in the eager pack without them."""
    graphed_all, eager_all = cuda_packs
    configs = _configs(tiny_backbone_dir, toy, "on")
    diverging = dataclasses.replace(configs[1], fidelity=dataclasses.replace(configs[1].fidelity, lr=1e36))
    monkeypatch.setenv("AUTOPEFT_INJECT_FAULT", "nan@12")
    pack = train_pack([configs[0], diverging, configs[2], configs[3]], trial_numbers=[10, 11, 12, 13],
                      memory_probe=False)
    assert pack.stats.cuda_graphs == 1 and pack.stats.graph_replays > 0
    assert pack.stats.graph_captures + pack.stats.graph_replays == pack.stats.steps
    assert isinstance(pack.results[1], TrialFailed) and pack.results[1].reason == "nan"
    assert isinstance(pack.results[2], TrialFailed) and pack.results[2].reason == "nan"
    assert "step 0" in pack.results[2].detail
    for k in (0, 3):
        assert isinstance(pack.results[k], TrialResult), pack.results[k]
        assert_same_losses(pack.results[k], eager_all.results[k])
        assert_same_weights(pack.results[k], eager_all.results[k])
        assert_same_weights(pack.results[k], graphed_all.results[k])


@needs_cuda
def test_graphed_pack_capture_failure_auto_warns_on_fails(tiny_backbone_dir: Path, toy: DataOptions,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A packed forward that reads a value on the host cannot be captured: under auto one warning and the
    pack trains on uncaptured (recorded in PackStats and each trial's extra), under on every trial fails."""
    from autopeft import train

    real = packing.build_packed_model

    def with_a_sync(base, models, specs):
        state = real(base, models, specs)
        base.classifier.register_forward_hook(lambda m, a, out: out + 0 * out.sum().item())
        return state

    monkeypatch.setattr(packing, "build_packed_model", with_a_sync)
    monkeypatch.setattr(train, "_GRAPH_WARNINGS", set())
    configs = _configs(tiny_backbone_dir, toy)[:2]
    with caplog.at_level(logging.WARNING, logger="autopeft.train"):
        auto = train_pack(configs, memory_probe=False)
    assert auto.stats.graph_failure and auto.stats.cuda_graphs == 0 and auto.stats.graph_captures == 0
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1
    for r, c in zip(auto.results, configs, strict=True):
        assert isinstance(r, TrialResult), r
        assert r.metrics.extra["cuda_graphs"] == 0.0 and r.metrics.steps == c.fidelity.max_steps
    on = train_pack(_configs(tiny_backbone_dir, toy, "on")[:2], memory_probe=False)
    assert all(isinstance(r, TrialFailed) and r.reason == "cuda_graphs" for r in on.results)


@needs_cuda
def test_graphed_pack_in_bf16_trains(tiny_backbone_dir: Path, toy: DataOptions) -> None:
    """The configuration the search runs: bf16 backbone under autocast (no cast cache), graphs under auto."""
    pack = train_pack(_configs(tiny_backbone_dir, toy), memory_probe=True)
    assert pack.stats.cuda_graphs == 1 and pack.stats.tokens_per_s > 0 and pack.stats.graph_replays > 0
    assert pack.stats.graph_captures + pack.stats.graph_replays == pack.stats.steps
    for r in pack.results:
        assert isinstance(r, TrialResult), r
        assert r.metrics.extra["cuda_graphs"] == 1.0 and r.metrics.peak_memory_mb > 0
        assert all(torch.isfinite(torch.tensor(r.loss_curve)))
