"""Trial packing: K trials trained together on one shared backbone equal K sequential `run_trial`s.

The tiny BERT has no dropout (one with dropout is checked too: the masks are keyed by trial, step and row, so
they are the same packed and alone), so packed and sequential training are the same computation up to
floating-point summation order (the pack is padded to its widest member): losses, final trainable weights and
scores must agree to a relative 1e-5 in fp32 (one exception, BitFit's attention key bias, is explained where it is
skipped). One pack covers every method, mixed per trial, with
different seeds, batch sizes and step counts, so each trial's schedule and data order are its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch

from autopeft.errors import TrialFailed, UserError
from autopeft.packing import PackedLinear, PackState, pack_trials, train_pack
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


def toy_pack_data(d: Path) -> DataOptions:
    """A small sentiment CSV task in `d`: enough rows for a few steps of several trials."""
    return DataOptions(train_file=str(write_sentiment_csv(d / "train.csv", 160, 0)),
                       dev_file=str(write_sentiment_csv(d / "dev.csv", 60, 1)),
                       text_column="review", label_column="label")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> DataOptions:
    return toy_pack_data(tmp_path_factory.mktemp("toy-pack"))


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
    assert pack.stats.grouped > 0 and pack.stats.looped == 0  # every adapted site ran grouped, every step
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
        assert_own_storage(packed.model)


def assert_own_storage(model: torch.nn.Module) -> None:
    """Every trainable tensor is a tensor of its own again (released from the pack's stacks): contiguous, alone
    in its storage, so safetensors saves it."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.is_contiguous() and p.untyped_storage().nbytes() == p.numel() * p.element_size(), name


@pytest.mark.slow
def test_loop_path_equals_sequential_trials(configs: list[TrialConfig], sequential: list[TrialResult],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`GROUPED = False` keeps every site on the per-segment loop, the reference the grouped path replaces."""
    import autopeft.packing

    monkeypatch.setattr(autopeft.packing, "GROUPED", False)
    pack = train_pack([configs[1], configs[2]])
    assert pack.stats.grouped == 0 and pack.stats.looped > 0
    for result, seq in zip(pack.results, (sequential[1], sequential[2]), strict=True):
        assert isinstance(result, TrialResult), result
        assert_same_trial(result, seq)


@pytest.mark.slow
def test_unequal_batches_group_and_equal_sequential(tiny_backbone_dir: Path, toy: DataOptions) -> None:
    """A full epoch at batch sizes 16 and 13 of 160 examples: 13's short last batch (4 rows) lands at a seeded
    random step, and 16 and 13 share no divisor, so those steps group in chunks of one row."""
    chosen = [cfg(tiny_backbone_dir, toy, TRIALS[0][0], lr=5e-3, seed=4, epochs=1, batch_size=16),
              cfg(tiny_backbone_dir, toy, TRIALS[2][0], lr=5e-3, seed=5, epochs=1, batch_size=13)]
    task = chosen[0].data.load("file")
    seq = [run_trial(c, task=task, progress=False) for c in chosen]
    pack = train_pack(chosen, task=task)
    assert pack.stats.grouped > 0 and pack.stats.looped == 0
    assert pack.stats.steps == 13
    for result, s in zip(pack.results, seq, strict=True):
        assert isinstance(result, TrialResult), result
        assert_same_trial(result, s)


@pytest.fixture(scope="module")
def dropout_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with BERT's dropouts (0.1 hidden, attention and head), and MiniLM's tokenizer."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    from autopeft.models import packaged_minilm
    from tests.conftest import tiny_config

    config = tiny_config("bert", layers=2)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.1
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert-dropout")
    AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(packaged_minilm() / f, out / f)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_packed_trials_with_dropout_equal_sequential_trials(dropout_backbone_dir: Path, toy: DataOptions,
                                                            static: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the backbone's dropout on, and LoRA's in one trial, packed and sequential trials draw the same masks
    (`autopeft.dropout`): the same losses and weights to 1e-5, each trial with its own seed, batch size and step
    count, eagerly and through the graphed path's host logic (`STATIC_WITHOUT_GRAPHS`)."""
    import autopeft.packing

    monkeypatch.setattr(autopeft.packing, "STATIC_WITHOUT_GRAPHS", static)
    lora_dropout = ({"lora": {"rank": {"q": 2, "ffn_out": 4}, "dropout": 0.2}}, {"seed": 5, "max_steps": 5})
    chosen = [cfg(dropout_backbone_dir, toy, spec, lr=5e-3, **fid)
              for spec, fid in (TRIALS[0], TRIALS[2], TRIALS[3], lora_dropout)]
    task = chosen[0].data.load("file")
    seq = [run_trial(c, task=task, progress=False) for c in chosen]
    pack = train_pack(chosen, task=task)
    for result, s in zip(pack.results, seq, strict=True):
        assert isinstance(result, TrialResult), result
        assert_same_trial(result, s)


@pytest.mark.slow
def test_packed_weights_save_and_load_as_trained(packed, configs: list[TrialConfig], tmp_path: Path) -> None:
    """After packed training each trial's weights save with safetensors as they are (no views into the pack's
    stacks) and, loaded into a fresh backbone, give the trial's model's outputs."""
    from safetensors.torch import save_file

    from autopeft.loading import build, read_weights
    from autopeft.models import load_backbone
    from autopeft.peft import trainable_state_dict

    ids = torch.randint(1000, 2000, (3, 7), generator=torch.Generator().manual_seed(0))
    for k, (result, c) in enumerate(zip(packed.results, configs, strict=True)):
        assert isinstance(result, TrialResult), result
        assert_own_storage(result.model)
        raw = {n: p.detach() for n, p in result.model.named_parameters() if p.requires_grad}
        save_file(raw, str(tmp_path / f"raw-{k}.safetensors"))  # refuses views and shared storage
        path = tmp_path / f"trial-{k}.safetensors"
        save_file(trainable_state_dict(result.model), str(path))
        weights = read_weights(path)
        for name, p in raw.items():
            assert torch.equal(weights[name], p), name
        fresh, _ = load_backbone(c.backbone, 2)
        loaded = build(fresh, result.spec, weights)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits,
                                       rtol=1e-6, atol=1e-6)


def test_pack_rejects_mixed_backbones(configs: list[TrialConfig]) -> None:
    other = dataclasses.replace(configs[0], backbone="minilm")
    with pytest.raises(UserError, match="one backbone"):
        pack_trials([configs[0], other])


def _frozen_linear(base: torch.nn.Linear, own_bias: bool = False) -> torch.nn.Linear:
    """`base` itself, or a linear sharing its frozen weight with a trainable bias of its own (BitFit)."""
    if not own_bias:
        return base
    lin = torch.nn.Linear(base.in_features, base.out_features)
    lin.weight = base.weight
    return lin


def _linear_slots(mix: str, base: torch.nn.Linear) -> list[torch.nn.Module]:
    """The trials' modules at one packed linear site, every term randomised away from its identity init."""
    from autopeft.peft.linear import PeftLinear

    def peft(module_type: str, own_bias: bool = False, **kw: object) -> PeftLinear:
        return PeftLinear(_frozen_linear(base, own_bias), module_type, **kw)

    slots = {
        "all": lambda: [peft("q", rank=2, alpha=4.0), peft("v", rank=3, alpha=3.0, dora=True), peft("o", ia3=True),
                        base],
        "lora_bias": lambda: [peft("q", rank=2, alpha=4.0), peft("v", True, rank=3, alpha=6.0), base,
                              _frozen_linear(base, True)],
        # every term at one site: LoRA of four ranks and two scalings, DoRA of two scalings (one with a bias
        # of its own), IA3 on either side with and without LoRA, rank-0 slots, a plain BitFit bias, nothing;
        # "lora_bias" has one scaling (the GEMM's alpha), the others one per trial
        # a frozen linear without a bias (as a bf16 backbone's folds DoRA too: no fp32 bias to promote), every
        # rescaling: IA3 on either side with LoRA, DoRA with IA3 in one trial, IA3 alone, nothing
        "no_bias": lambda: [peft("q", rank=2, alpha=4.0, ia3=True), peft("v", rank=3, alpha=3.0, dora=True, ia3=True),
                            peft("ffn_out", rank=1, alpha=2.0, ia3=True), peft("o", ia3=True), base],
        "mixed": lambda: [peft("q", rank=2, alpha=4.0, ia3=True), peft("q", True, rank=3, alpha=3.0, dora=True),
                          peft("o", ia3=True), _frozen_linear(base, True), base,
                          peft("v", rank=4, alpha=8.0, dora=True), peft("ffn_out", rank=1, alpha=2.0, ia3=True)],
    }[mix]()
    for s in slots:
        for p in s.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p)
    return slots


def packed_site(mix: str) -> tuple[list[torch.nn.Module], PackState, PackedLinear]:
    """One packed linear site over `_linear_slots(mix)`: its trials' modules, its PackState, the site."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6, bias=mix != "no_bias")
    for p in base.parameters():
        p.requires_grad_(False)
    slots = _linear_slots(mix, base)
    state = PackState()
    return slots, state, PackedLinear(base, slots, state)


def _layout(name: str, slots: int) -> list[tuple[int, int, int]]:
    if name == "identity":  # every slot, in order, equal sizes: no gathering
        return [(k, 2 * k, 2 * k + 2) for k in range(slots)]
    if name == "gather":  # equal sizes, some slots absent, out of order
        return [(slots - 1, 0, 2), (0, 2, 4), (2, 4, 6)]
    return [(2, 0, 3), (0, 3, 5), (3, 5, 6), (1, 6, 9)]  # unequal sizes: one-row chunks


@pytest.mark.parametrize(("layout", "path"), [("identity", "grouped"), ("gather", "grouped"), ("unequal", "grouped"),
                                             ("identity", "loop"), ("gather", "loop"), ("unequal", "loop"),
                                             ("identity", "folded"), ("gather", "folded")])
@pytest.mark.parametrize("mix", ["all", "lora_bias", "mixed", "no_bias"])
@pytest.mark.parametrize("autocast", [False, True])
def test_packed_linear_segments_are_each_trials_own_layer(mix: str, autocast: bool, path: str, layout: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct check of the segmented op: each trial's rows get exactly its own PeftLinear's output and
    gradients, grouped (stacked parameters, batched GEMMs), folded (each trial's LoRA in a weight of its own,
    what "auto" runs in a graphed step on a GPU; `kernels.grouped_fold`) and per segment, on the out-of-place
    path (DoRA, IA3) and the in-place one (LoRA, BitFit biases), for every row layout, in fp32 and under bf16
    autocast (what training on a GPU runs). A slot with no rows in the batch gets no gradient, as autograd would."""
    from autopeft import kernels
    from autopeft.kernels import grouped_fold

    grouped = path != "loop"
    folded = []
    if path == "folded":  # a CPU tensor standing in for a CUDA one, in a graphed step
        monkeypatch.setattr(kernels, "_on_gpu", lambda x: True)
        monkeypatch.setattr(kernels, "triton_available", lambda: True)
        monkeypatch.setattr(kernels, "AUTO_TRITON", frozenset())  # the unfolded rescalings: PyTorch's, on a CPU
        real = grouped_fold.grouped_lora_linear
        monkeypatch.setattr(grouped_fold, "grouped_lora_linear", lambda *a, **k: folded.append(1) or real(*a, **k))
        stack = contextlib.ExitStack()
        stack.enter_context(kernels.graphed())
    else:
        stack = contextlib.ExitStack()
    slots, state, packed = packed_site(mix)
    assert packed.in_place == (mix == "lora_bias")
    if grouped:
        assert state.stack() == 1
    state.segments = _layout(layout, len(slots))
    rows = state.segments[-1][2]
    x = torch.randn(rows, 5, 8, requires_grad=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    params = [p for s in slots for p in s.parameters() if p.requires_grad]
    with ctx, stack:
        y = packed(x)
    assert (state.grouped, state.looped) == ((1, 0) if grouped else (0, 1))
    # a gathered layout stays unfolded, and so does an output an fp32 bias promotes (DoRA's, under autocast)
    assert len(folded) == (path == "folded" and layout == "identity" and not (autocast and packed._promotes))
    y.float().square().sum().backward()
    grads = [x.grad, *(p.grad for p in params)]
    with ctx:
        own = torch.cat([slots[k](x[s:e]) for k, s, e in state.segments])
    own_grads = torch.autograd.grad(own.float().square().sum(), [x, *params], allow_unused=True)
    assert y.dtype == own.dtype
    if folded and autocast:  # W + s B A rounded to bf16 as a whole, which entries that nearly cancel show
        assert _rel(y, own) <= 2e-2, _rel(y, own)
    else:
        torch.testing.assert_close(y, own, **tol)
    _assert_same_grads(grads, own_grads, autocast)


def _assert_same_grads(grads: list[torch.Tensor | None], expected: list[torch.Tensor | None], bf16: bool) -> None:
    """Gradients agree to fp32 (bf16) rounding relative to their size: a sum of large terms that nearly cancel
    shows the order of summation elementwise, which is all that differs between batched and per-segment GEMMs."""
    for g, o in zip(grads, expected, strict=True):
        assert (g is None) == (o is None)
        if g is not None:
            assert _rel(g, o) <= (2e-2 if bf16 else 1e-5), _rel(g, o)


def test_grouped_padding_stays_zero_and_trials_optimise_independently() -> None:
    """Stacks are padded to the widest rank; the padding is no trial's parameter, gets exactly zero gradient
    (so it could not leak into the real entries) and no optimiser writes it, and each trial's own AdamW steps
    its own parameters (views of the stacks) exactly as it would alone. Release gives each parameter its own
    storage back, with its trained values."""
    from autopeft.packing import PackState

    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    for p in base.parameters():
        p.requires_grad_(False)
    slots = _linear_slots("mixed", base)
    twins = [_linear_slots("mixed", base)[k] for k in range(len(slots))]  # the same trials, trained alone
    for s, t in zip(slots, twins, strict=True):
        t.load_state_dict(s.state_dict())
    state = PackState()
    packed = PackedLinear(base, slots, state)
    assert state.stack() == 1
    stacks = packed._stacks
    ranks = [getattr(s, "rank", 0) for s in slots]
    opts = [torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1) for m in (*slots, *twins)
            if (ps := [p for p in m.parameters() if p.requires_grad])]
    own = [p for s in slots for p in s.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(2 * len(slots), 4, 8, generator=gen)
        state.segments = _layout("identity", len(slots))
        y = packed(x)
        loss = sum(y[s:e].square().mean() for _, s, e in state.segments)  # as train_pack: per-trial means
        leaf_grads = torch.autograd.grad(loss, [stacks["A"].leaf, stacks["Bt"].leaf], retain_graph=True)
        for g in leaf_grads:
            for k, r in enumerate(ranks):
                assert g[k, r:].count_nonzero() == 0
        loss.backward()
        sum(t(x[s:e]).square().mean() for t, (_, s, e) in zip(twins, state.segments, strict=True)).backward()
        for opt in opts:
            opt.step()
        # parameter, gradient and AdamW state share strides (B is a transposed view): foreach's fast path
        for p in own:
            assert p.grad.stride() == p.stride() == next(o.state[p]["exp_avg"] for o in opts if p in o.state).stride()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
    for k, r in enumerate(ranks):
        assert stacks["A"].leaf[k, r:].count_nonzero() == 0 and stacks["Bt"].leaf[k, r:].count_nonzero() == 0
    for s, t in zip(slots, twins, strict=True):
        for p, q in zip(s.parameters(), t.parameters(), strict=True):
            if p.requires_grad:
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    lora_a = slots[0].autopeft_lora_A
    assert lora_a.untyped_storage().data_ptr() == stacks["A"].leaf.untyped_storage().data_ptr()
    trained = {id(p): p.detach().clone() for s in slots for p in s.parameters() if p.requires_grad}
    state.release()
    assert packed._stacks is None
    for s in slots:
        for p in s.parameters():
            if p.requires_grad:
                assert p.is_contiguous() and p.untyped_storage().nbytes() == p.numel() * p.element_size()
                assert torch.equal(p, trained[id(p)])


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("acc", [None, "full", "broadcast"])
def test_gathered_bmm_gradients(acc: str | None, transpose: bool) -> None:
    """The chunked GEMM that re-gathers its weights in backward instead of keeping a copy: exact gradients."""
    from autopeft.packing import _GatheredBmm

    torch.manual_seed(0)
    idx = torch.tensor([2, 0, 0, 1, 2])
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, *((2, 4) if transpose else (4, 2)), dtype=torch.float64, requires_grad=True)
    if acc is None:
        assert torch.autograd.gradcheck(lambda x, w: _GatheredBmm.apply(None, x, w, idx, 1.0, transpose), (x, w))
        return
    a = torch.randn(5, 3 if acc == "full" else 1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, x, w: _GatheredBmm.apply(a, x, w, idx, 1.5, transpose), (a, x, w))


def test_per_trial_dropout_stays_on_the_loop() -> None:
    """LoRA dropout draws one mask per trial, as sequential training does: such a site is not stacked."""
    from autopeft.packing import PackState
    from autopeft.peft.linear import PeftLinear

    base = torch.nn.Linear(8, 6)
    state = PackState()
    packed = PackedLinear(base, [PeftLinear(base, "q", rank=2, alpha=2.0, dropout=0.1),
                                 PeftLinear(base, "q", rank=2, alpha=2.0)], state)
    assert state.stack() == 0 and packed._stacks is None
    state.segments = [(0, 0, 2), (1, 2, 4)]
    packed(torch.randn(4, 3, 8))
    assert (state.grouped, state.looped) == (0, 1)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("layout", ["identity", "unequal"])
def test_adapter_site_grouped_equals_each_trials_adapters(layout: str, autocast: bool) -> None:
    """Serial and parallel bottleneck adapters of several sizes and scales at one output, grouped against
    per segment: the same outputs and gradients, and zero padding of the narrower bottlenecks stays zero."""
    from autopeft.packing import PackState, _AdapterSite
    from autopeft.peft.parallel_adapter import ParallelAdapter
    from autopeft.peft.serial_adapter import SerialAdapter

    torch.manual_seed(0)
    like = torch.empty(0)
    hidden = 8

    def serial(size: int) -> SerialAdapter:
        return SerialAdapter(hidden, size, "gelu", like)

    def parallel(size: int, scale: float) -> ParallelAdapter:
        return ParallelAdapter(hidden, size, "gelu", scale, like)

    ops = {0: [("serial", serial(4)), ("parallel", parallel(2, 4.0))], 1: [("parallel", parallel(3, 2.0))],
           3: [("serial", serial(1))]}
    for kind_adapters in ops.values():
        for _, a in kind_adapters:
            for p in a.parameters():
                torch.nn.init.normal_(p)
    results = []
    for grouped in (True, False):
        state = PackState()
        site = _AdapterSite(state, ops, 0, 4)
        if grouped:
            assert state.stack() == 1
        state.segments = _layout(layout, 4)
        rows = state.segments[-1][2]
        gen = torch.Generator().manual_seed(2)
        out = torch.randn(rows, 5, hidden, generator=gen, requires_grad=True)
        x = torch.randn(rows, 5, hidden, generator=gen, requires_grad=True)
        state.captured[0] = x
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            y = site(None, (x,), out)
        assert (state.grouped, state.looped) == ((1, 0) if grouped else (0, 1))
        y.float().square().sum().backward()
        params = [p for kind_adapters in ops.values() for _, a in kind_adapters for p in a.parameters()]
        results.append((y.detach(), [out.grad, x.grad, *(None if p.grad is None else p.grad.clone() for p in params)]))
        for p in params:
            p.grad = None
        if grouped:
            for p in site._passes:
                for name in ("down", "down_bias", "up_t", "up_bias"):
                    stack = p[name]
                    for k, (_, region) in stack.views.items():
                        padded = stack.leaf[k].clone()
                        padded[region[1:]] = 0
                        assert padded.count_nonzero() == 0, (name, k)
            state.release()
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    (y, grads), (y_loop, grads_loop) = results
    assert y.dtype == y_loop.dtype
    torch.testing.assert_close(y, y_loop, **tol)
    _assert_same_grads(grads, grads_loop, autocast)


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


def randomised_trials(family: str) -> tuple[torch.nn.Module, list[torch.nn.Module], list]:
    """A tiny backbone and one injected model per FORWARD_SPECS trial sharing its frozen tensors, every adapter
    randomised away from its identity init (so a packed forward that dropped a term would show): the backbone,
    the trial models and their specs."""
    from autopeft.packing import _share_frozen
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
        trials.append(model)
        specs.append(spec)
    return base, trials, specs


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_packed_forward_equals_each_trials_model(family: str, grouped: bool) -> None:
    """Forward only, with every adapter randomised away from its identity init: on each trial's rows the
    packed model gives what the trial's own injected model gives, for both architecture families, grouped
    and per segment."""
    from autopeft.packing import build_packed_model

    base, trials, specs = randomised_trials(family)
    trials = [m.eval() for m in trials]
    state = build_packed_model(base, trials, specs)
    if grouped:
        assert state.stack() > 0
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
    assert (state.grouped > 0 and state.looped == 0) if grouped else state.grouped == 0


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


def test_a_finished_pack_frees_its_stacks(configs: list[TrialConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack's stacks (its trials' parameters and gradients, on the GPU) die with it. Their gradient hook once
    held them, a cycle through the tensor's C++ side that Python's collector cannot break: every pack's stacks
    outlived it, and on an H200 the memory allocated before each pack of a search kept growing."""
    import gc
    import weakref

    from autopeft import packing

    made: list[weakref.ref] = []
    init = packing._Stack.__init__

    def spy(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(packing._Stack, "__init__", spy)
    pack = train_pack(configs[:3], task=configs[0].data.load("file"), device="cpu")
    assert all(isinstance(r, TrialResult) for r in pack.results)
    del pack
    gc.collect()
    assert made and all(r() is None for r in made)
