"""`autopeft.dropout`: a backbone's dropouts keyed by trial, step and row, attention's turned off, and the keys
the trainers give a forward."""

from __future__ import annotations

import torch
from torch import nn

from autopeft import dropout
from tests.conftest import tiny_config


def _bert_with_dropout() -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config("bert")
    cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob = 0.1, 0.1
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa")


def test_install_keys_hidden_dropouts_and_turns_attention_dropout_off() -> None:
    model = _bert_with_dropout()
    dropout.install(model)
    keyed = {n: m for n, m in model.named_modules() if isinstance(m, dropout.KeyedDropout)}
    # embeddings, each layer's attention output and FFN output, the head: all at the configured p
    assert "bert.embeddings.dropout" in keyed and "dropout" in keyed
    assert {n for n in keyed if "layer." in n} == {f"bert.encoder.layer.{i}.{s}.dropout"
                                                   for i in range(3) for s in ("attention.output", "output")}
    assert all(m.p == 0.1 for m in keyed.values())
    assert len({m.site for m in keyed.values()}) == len(keyed)  # one site per module, from its name
    assert keyed["dropout"].site == dropout.site_of("dropout")
    for layer in model.bert.encoder.layer:  # what BERT hands SDPA as its dropout probability
        assert type(layer.attention.self.dropout) is nn.Dropout and layer.attention.self.dropout.p == 0.0
    assert model.config.attention_probs_dropout_prob == 0.0
    before = [(n, type(m)) for n, m in model.named_modules()]
    dropout.install(model)  # again: nothing changes
    assert [(n, type(m)) for n, m in model.named_modules()] == before


def test_a_rows_output_is_the_same_alone_and_in_a_batch() -> None:
    """What a pack relies on: a row's dropout depends on its own key, not on the rows around it or the
    padding after it; and each step draws anew."""
    m = dropout.KeyedDropout(0.5, dropout.site_of("x")).train()
    x = torch.ones(5, 9, 8)
    keys = torch.cat([dropout.row_keys(0, 3, 2), dropout.row_keys(7, 3, 3)])  # two trials' rows
    with dropout.rows(keys):
        packed = m(x)
    with dropout.rows(dropout.row_keys(7, 3, 3)):
        alone = m(x[2:, :4])
    assert torch.equal(packed[2:, :4], alone)
    with dropout.rows(dropout.row_keys(7, 4, 3)):
        assert not torch.equal(m(x[2:]), packed[2:])
    with dropout.rows(keys), dropout.narrowed(2, 5):  # a trial's own module inside a pack
        assert torch.equal(m(x[2:]), packed[2:])


def test_without_keys_it_is_plain_dropout_and_identity_in_eval() -> None:
    m = dropout.KeyedDropout(0.5, 1)
    x = torch.ones(64, 32)
    assert torch.equal(m.eval()(x), x)
    m.train()
    torch.manual_seed(0)
    y = m(x)  # no keys: F.dropout's random mask
    assert 0.4 < (y == 0).float().mean().item() < 0.6
    with dropout.rows(dropout.row_keys(0, 0, 3)):  # keys for other rows than these: unkeyed too
        torch.manual_seed(0)
        assert torch.equal(m(x), y)


def test_row_keys_are_distinct_and_reproducible() -> None:
    a = dropout.row_keys(5, 10, 4)
    assert torch.equal(a, dropout.row_keys(5, 10, 4)) and a.dtype == torch.int64
    everything = torch.cat([a, dropout.row_keys(5, 11, 4), dropout.row_keys(6, 10, 4),
                            dropout.row_keys(2**40 + 5, 10, 4)])
    assert everything.unique().numel() == everything.numel()
    assert int(everything.min()) >= 0 and int(everything.max()) < 2**32


def test_trained_steps_repeat_exactly_with_keys() -> None:
    """Two forwards with the same keys are the same computation, gradients included."""
    model = _bert_with_dropout()
    dropout.install(model)
    model.train()
    ids = torch.randint(5, 100, (3, 10))
    outs = []
    for _ in range(2):
        model.zero_grad()
        with dropout.rows(dropout.row_keys(1, 0, 3)):
            out = model(input_ids=ids).logits
        out.sum().backward()
        outs.append((out.detach(), model.classifier.weight.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_a_module_called_twice_in_a_forward_draws_two_masks() -> None:
    """RoBERTa's head applies one dropout module twice per forward: two independent masks, as `F.dropout` would
    draw, and the same two in every forward with the same keys, alone or inside a pack's `narrowed` rows."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.5)
    model = RobertaForSequenceClassification(config)
    dropout.install(model)
    model.train()
    seen: list[torch.Tensor] = []
    model.classifier.dropout.register_forward_hook(lambda m, args, out: seen.append(out == 0))
    ids = torch.randint(3, 200, (4, 12))
    keys = dropout.row_keys(2, 5, 4)
    with dropout.rows(keys):
        model(input_ids=ids)
    first, second = seen
    assert first.shape == second.shape == (4, 32) and not torch.equal(first, second)
    with dropout.rows(keys):
        model(input_ids=ids)
    assert torch.equal(seen[2], first) and torch.equal(seen[3], second)
    head = model.classifier  # as a pack runs a trial's own head: on its rows, after another trial's two rows
    x = torch.randn(6, 12, 32)
    with dropout.rows(torch.cat([dropout.row_keys(9, 0, 2), keys])), dropout.narrowed(2, 6):
        head(x[2:])
    assert torch.equal(seen[4], first) and torch.equal(seen[5], second)
