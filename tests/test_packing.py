"""Trial packing: K trials trained together on one shared backbone equal K sequential `run_trial`s.

The tiny BERT has no dropout, so packed and sequential training are the same computation up to floating-point
summation order (the pack is padded to its widest member): losses, final trainable weights and scores must
agree to a relative 1e-5 in fp32 (one exception, BitFit's attention key bias, is explained where it is
skipped). One pack covers every method, mixed per trial, with
different seeds, batch sizes and step counts, so each trial's schedule and data order are its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from autopeft.errors import TrialFailed, UserError
from autopeft.packing import PackedLinear, pack_trials, train_pack
from autopeft.peft import trainable_state_dict
from autopeft.train import DataOptions, TrialConfig, TrialResult, run_trial
from tests.test_train import cfg, write_sentiment_csv

REL = 1e-5

#: (spec, fidelity overrides): every method, several per trial, different seeds / batch sizes / lengths
TRIALS = [
    ({"lora": {"rank": {"q": 4, "v": 4}}, "ia3": ["k", "ffn_out"]}, {"seed": 0, "max_steps": 6}),
    ({"dora": {"rank": {"q": 2, "o": 4}}, "bitfit": [True, False]}, {"seed": 1, "max_steps": 5, "batch_size": 8}),
    ({"serial_adapter": {"size": 8, "position": "houlsby"}, "parallel_adapter": {"size": 4},
      "lora": {"rank": {"ffn_in": 2}}}, {"seed": 2, "max_steps": 7}),
    ({"prefix": {"length": 3}, "bitfit": True, "ia3": ["o", "v"]}, {"seed": 3, "max_steps": 6, "batch_size": 12}),
    ({"prefix": {"length": 2, "gate": False}, "lora": {"rank": {"k": 3}}, "serial_adapter": {"size": {0: 4}}},
     {"seed": 0, "max_steps": 4}),
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> DataOptions:
    d = tmp_path_factory.mktemp("toy-pack")
    return DataOptions(train_file=str(write_sentiment_csv(d / "train.csv", 160, 0)),
                       dev_file=str(write_sentiment_csv(d / "dev.csv", 60, 1)),
                       text_column="review", label_column="label")


@pytest.fixture(scope="module")
def configs(tiny_backbone_dir: Path, toy: DataOptions) -> list[TrialConfig]:
    return [cfg(tiny_backbone_dir, toy, spec, lr=5e-3, **fid) for spec, fid in TRIALS]


@pytest.fixture(scope="module")
def sequential(configs: list[TrialConfig]) -> list[TrialResult]:
    task = configs[0].data.load("file")
    return [run_trial(c, task=task, progress=False) for c in configs]


@pytest.fixture(scope="module")
def packed(configs: list[TrialConfig]):
    return train_pack(configs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def assert_same_trial(packed: TrialResult, seq: TrialResult) -> None:
    assert packed.spec == seq.spec
    assert len(packed.loss_curve) == len(seq.loss_curve) == seq.metrics.steps == packed.metrics.steps
    worst = max(abs(a - b) / abs(b) for a, b in zip(packed.loss_curve, seq.loss_curve, strict=True))
    assert worst <= REL, (seq.spec.summary(), packed.loss_curve, seq.loss_curve)
    pw, sw = trainable_state_dict(packed.model), trainable_state_dict(seq.model)
    assert pw.keys() == sw.keys()
    for name in sw:
        if name.endswith("attention.self.key.bias"):
            # BitFit's key bias has a gradient of exactly zero in real arithmetic (softmax is invariant to
            # adding q.b to every score of a query), so AdamW turns pure rounding noise into lr-sized steps and
            # any change of summation order (here: the pack's wider padding) moves it. It cannot change the
            # model's function, which the equal losses and scores above and below check.
            continue
        assert _rel(pw[name], sw[name]) <= REL, (seq.spec.summary(), name, _rel(pw[name], sw[name]))
    assert packed.metrics.trainable_params == seq.metrics.trainable_params
    assert packed.metrics.backbone_params == seq.metrics.backbone_params
    assert packed.metrics.metric == pytest.approx(seq.metrics.metric, abs=1e-9)


@pytest.mark.slow
def test_packed_trials_equal_sequential_trials(configs: list[TrialConfig], sequential: list[TrialResult],
                                               packed) -> None:
    pack = packed
    assert pack.stats.size == len(configs)
    assert pack.stats.steps == max(c.fidelity.max_steps for c in configs)  # shorter trials leave the pack early
    assert pack.stats.tokens > 0 and pack.stats.tokens_per_s > 0
    for result, seq in zip(pack.results, sequential, strict=True):
        assert isinstance(result, TrialResult), result
        assert_same_trial(result, seq)


@pytest.mark.slow
def test_packed_model_shares_the_backbone(packed) -> None:
    """The trials' models hold the shared backbone's frozen tensors, not copies: a trial costs what it trains."""
    models = [r.model for r in packed.results]
    frozen = [{id(p) for p in m.parameters() if not p.requires_grad} for m in models]
    trained = [{id(p) for p in m.parameters() if p.requires_grad} for m in models]
    assert frozen[0] == frozen[2] and frozen[0]  # neither trains a backbone tensor: the very same ones
    assert frozen[1] < frozen[0]  # BitFit (layer 0) trains its own copies of those biases, shares the rest
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            assert not trained[i] & trained[j]


@pytest.mark.slow
def test_nan_trial_leaves_the_pack_others_unharmed(configs: list[TrialConfig], sequential: list[TrialResult],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # trial 1 diverges for real (a learning rate that overflows the weights); trial 2 gets an injected NaN
    diverging = dataclasses.replace(configs[1], fidelity=dataclasses.replace(configs[1].fidelity, lr=1e36))
    with pytest.raises(TrialFailed) as alone:
        run_trial(diverging, progress=False)
    assert alone.value.reason == "nan"
    monkeypatch.setenv("AUTOPEFT_INJECT_FAULT", "nan@12")
    results = pack_trials([configs[0], diverging, configs[2], configs[3]], trial_numbers=[10, 11, 12, 13])
    assert isinstance(results[1], TrialFailed) and results[1].reason == "nan"
    assert isinstance(results[2], TrialFailed) and results[2].reason == "nan"
    assert "step 0" in results[2].detail
    for packed, seq in ((results[0], sequential[0]), (results[3], sequential[3])):
        assert isinstance(packed, TrialResult), packed
        assert_same_trial(packed, seq)


def test_pack_rejects_mixed_backbones(configs: list[TrialConfig]) -> None:
    other = dataclasses.replace(configs[0], backbone="minilm")
    with pytest.raises(UserError, match="one backbone"):
        pack_trials([configs[0], other])


@pytest.mark.parametrize("mix", ["all", "lora_bias"])
@pytest.mark.parametrize("autocast", [False, True])
def test_packed_linear_segments_are_each_trials_own_layer(mix: str, autocast: bool) -> None:
    """A direct check of the segmented op: each trial's rows get exactly its own PeftLinear's output and
    gradients, on the out-of-place path (DoRA, IA3) and the in-place one (LoRA, BitFit biases), in fp32 and
    under bf16 autocast (what training on a GPU runs)."""
    from autopeft.packing import PackState
    from autopeft.peft.linear import PeftLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    for p in base.parameters():
        p.requires_grad_(False)
    own_bias = torch.nn.Linear(8, 6)
    own_bias.weight = base.weight
    if mix == "all":
        slots = [PeftLinear(base, "q", rank=2, alpha=4.0), PeftLinear(base, "v", rank=3, alpha=3.0, dora=True),
                 PeftLinear(base, "o", ia3=True), base]
    else:
        slots = [PeftLinear(base, "q", rank=2, alpha=4.0), PeftLinear(own_bias, "v", rank=3, alpha=3.0),
                 base, own_bias]
    for s in slots:
        for n, p in s.named_parameters():
            if "autopeft" in n:
                torch.nn.init.normal_(p)
    state = PackState()
    packed = PackedLinear(base, slots, state)
    assert packed.in_place == (mix != "all")
    x = torch.randn(9, 5, 8, requires_grad=True)
    state.segments = [(2, 0, 3), (0, 3, 5), (3, 5, 6), (1, 6, 9)]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-6, "atol": 1e-6}
    params = [p for s in slots for p in s.parameters() if p.requires_grad]
    with ctx:
        y = packed(x)
    grads = torch.autograd.grad(y.float().square().sum(), [x, *params], allow_unused=True)
    with ctx:
        own = torch.cat([slots[k](x[s:e]) for k, s, e in state.segments])
    own_grads = torch.autograd.grad(own.float().square().sum(), [x, *params], allow_unused=True)
    assert y.dtype == own.dtype
    torch.testing.assert_close(y, own, **tol)
    for g, o in zip(grads, own_grads, strict=True):
        assert (g is None) == (o is None)
        if g is not None:
            torch.testing.assert_close(g, o, rtol=tol["rtol"] * 5, atol=tol["atol"] * 5)


FORWARD_SPECS = {
    "bert": [{"lora": {"rank": {"q": 2, "v": 4}}, "ia3": ["ffn_out"]},
             {"dora": {"rank": {"o": 2}}, "bitfit": [False, True, False]},
             {"serial_adapter": {"size": 4, "position": "houlsby"}, "parallel_adapter": {"size": {1: 2}}},
             {"prefix": {"length": 2}, "ia3": ["k"]},
             {"prefix": {"length": {0: 3}, "gate": False}, "lora": {"rank": {"ffn_in": 2}}},
             {}],
    "llama": [{"lora": {"rank": {"q": 2, "ffn_in": 2}}, "ia3": ["ffn_out"]},
              {"dora": {"rank": {"v": 2}}},
              {"serial_adapter": {"size": 4}, "parallel_adapter": {"size": 2}},
              {"prefix": {"length": 2}},
              {"prefix": {"length": {2: 3}, "gate": False}, "ia3": ["k", "o"]}],
}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_packed_forward_equals_each_trials_model(family: str) -> None:
    """Forward only, with every adapter randomised away from its identity init: on each trial's rows the
    packed model gives what the trial's own injected model gives, for both architecture families."""
    from autopeft.packing import _share_frozen, build_packed_model
    from autopeft.peft import inject
    from autopeft.spec import PeftSpec
    from tests.conftest import tiny_model

    base = tiny_model(family)
    shared = dict(base.named_parameters())
    trials, specs = [], []
    for k, d in enumerate(FORWARD_SPECS[family]):
        model = tiny_model(family)
        spec = PeftSpec.from_dict(d, num_layers=3)
        torch.manual_seed(k)
        inject(model, spec)
        _share_frozen(model, shared)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
        trials.append(model.eval())
        specs.append(spec)
    state = build_packed_model(base, trials, specs)
    base.eval()
    gen = torch.Generator().manual_seed(0)
    sizes = [2, 3, 1, 2, 3, 1][:len(trials)]
    rows, width = sum(sizes), 9
    ids = torch.randint(1, 1000, (rows, width), generator=gen)
    lengths = torch.randint(3, width + 1, (rows,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0 on the right
    state.segments, start = [], 0
    for k, n in enumerate(sizes):
        state.segments.append((k, start, start + n))
        start += n
    with torch.no_grad():
        packed = base(input_ids=ids, attention_mask=mask).logits
        for k, s, e in state.segments:
            own = trials[k](input_ids=ids[s:e], attention_mask=mask[s:e]).logits
            torch.testing.assert_close(packed[s:e], own, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"trial {k}: {m}")


def test_plan_pack_size_fills_the_budget() -> None:
    from autopeft.packing import plan_pack_size

    assert plan_pack_size(80_000, backbone_mb=2_000, per_trial_mb=9_000) == 8
    assert plan_pack_size(80_000, backbone_mb=2_000, per_trial_mb=100_000) == 1  # alone, as unpacked
    assert plan_pack_size(80_000, backbone_mb=2_000, per_trial_mb=10, max_size=16) == 16


@pytest.mark.slow
def test_heldout_selection_as_the_search_runs_it(configs: list[TrialConfig]) -> None:
    """The search's mode: train on part of train, score on the seeded held-out rest, dev measured beside."""
    chosen = [configs[0], configs[3]]
    task = chosen[0].data.load("file")
    seq = [run_trial(c, task=task, select="heldout", heldout_fraction=0.25, progress=False) for c in chosen]
    results = pack_trials(chosen, task, select="heldout", heldout_fraction=0.25)
    for packed_result, s in zip(results, seq, strict=True):
        assert isinstance(packed_result, TrialResult), packed_result
        assert_same_trial(packed_result, s)
        assert packed_result.metrics.dev_metric == pytest.approx(s.metrics.dev_metric, abs=1e-9)
