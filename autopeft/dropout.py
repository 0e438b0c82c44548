"""The backbone's dropout, keyed by trial, step and row, so a packed trial draws the masks it would draw alone.

`install` (called on every backbone our trainers load, `train.seeded_backbone`) makes two changes:

* every `nn.Dropout` of the backbone and its head becomes a `KeyedDropout` of the same p, whose mask is a hash
  of (row key, site, position, feature) (`kernels.keyed_dropout`). The site is the module's name, so a trial's
  own model and the pack's shared backbone agree on it. LoRA's dropout goes through `apply` too (its site is
  the adapted linear's place, `PeftLinear.dropout_site`);
* attention's dropout is turned off (its probability set to 0). SDPA draws that mask inside its kernel from
  one random stream, which no key can reach, so packed and sequential trials could not agree on it. This is a
  change from the pre-trained config's attention dropout (0.1 for BERT and RoBERTa), made for every trial alike;
  the hidden dropouts stay as configured.

The trainers give each forward its rows' keys (`rows`): `row_keys(seed, step, n)` for a trial's batch of n rows
at its step, and a pack concatenates its trials' keys as it concatenates their rows. A `KeyedDropout` called
with no keys, or keys for other rows (a model used outside our trainers), falls back to `F.dropout`.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import zlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from autopeft.kernels.keyed_dropout import keyed_dropout, mix32

#: the batch entry our training loops carry the rows' keys in (taken out before the model sees the batch)
KEYS = "autopeft_dropout_keys"

#: attention modules' float attributes that hold attention's dropout probability, across transformers versions
ATTENTION_DROPOUT_ATTRS = ("attention_dropout", "dropout_prob", "attn_dropout")

#: (the keys of the forward running now, that forward's number), per thread and task as `train.CURRENT_TRIAL`
_KEYS: contextvars.ContextVar[tuple[torch.Tensor | None, int]] = contextvars.ContextVar(
    "autopeft_dropout_keys", default=(None, -1))
_forwards = itertools.count()


def row_keys(seed: int, step: int, rows: int) -> torch.Tensor:
    """The keys of a trial's batch of `rows` rows at `step` (int64 holding 32-bit values): the same whether the
    trial trains alone or in a pack."""
    trial = mix32(mix32(mix32(seed) ^ (seed >> 32)) ^ step)
    return mix32(trial + torch.arange(rows, dtype=torch.int64))


@contextlib.contextmanager
def rows(keys: torch.Tensor | None) -> Iterator[None]:
    """Key the dropouts of the forward run inside by `keys` (one per row of its batch; None: unkeyed)."""
    token = _KEYS.set((keys, next(_forwards)))
    try:
        yield
    finally:
        _KEYS.reset(token)


@contextlib.contextmanager
def narrowed(start: int, stop: int) -> Iterator[None]:
    """Inside a pack, a trial's own module runs on its rows [start, stop): its dropouts take those rows' keys."""
    keys = _KEYS.get()[0]
    with rows(None if keys is None else keys[start:stop]):
        yield


def site_of(name: str) -> int:
    """A dropout site's 31-bit id, from its module's qualified name."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _keys_for(x: torch.Tensor) -> torch.Tensor | None:
    """The forward's keys where they are one per row of x."""
    keys = _KEYS.get()[0]
    return keys if keys is not None and keys.numel() == x.shape[0] else None


def keyed_for(x: torch.Tensor) -> bool:
    """Whether the forward running now has keys for x's rows."""
    return _keys_for(x) is not None


def apply(x: torch.Tensor, p: float, site: int, training: bool) -> torch.Tensor:
    """Dropout of x at `site`: keyed where the forward has keys for x's rows, else `F.dropout`."""
    if not training or not p:
        return x
    keys = _keys_for(x)
    if keys is None:
        return F.dropout(x, p, True)
    return keyed_dropout(x, p, keys.to(x.device), site)


class KeyedDropout(nn.Module):
    """`nn.Dropout(p)` with the mask keyed by the rows given to `rows` (see the module docstring). Called again
    within one `rows` context (RoBERTa's head applies its dropout twice), each call after the first takes a site
    of its own, so the masks are independent as `F.dropout`'s are; a pack runs a trial's own head inside
    `narrowed`, a context of its own, so its calls count from the first there too."""

    def __init__(self, p: float, site: int) -> None:
        super().__init__()
        self.p, self.site = p, site
        self._forward, self._calls = -1, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        forward = _KEYS.get()[1]
        if forward != self._forward:
            self._forward, self._calls = forward, 0
        site = self.site if not self._calls else mix32(self.site + self._calls) & 0x7FFFFFFF
        self._calls += 1
        return apply(x, self.p, site, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


def install(model: nn.Module) -> None:
    """Key `model`'s dropouts and turn its attention dropout off (module docstring); idempotent."""
    from autopeft.models import ARCHITECTURES, get_layers

    arch = ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None))
    attention = set()
    if arch is not None:
        for layer in get_layers(model):
            att = layer.get_submodule(arch.attention)
            attention.add(id(att))
            for attr in ATTENTION_DROPOUT_ATTRS:  # a float the attention function is given (Llama's family)
                if isinstance(getattr(att, attr, None), float):
                    setattr(att, attr, 0.0)
    config = getattr(model, "config", None)
    for key in ("attention_probs_dropout_prob", "attention_dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Dropout:
                continue
            if id(module) in attention:  # its p is what the attention function is given
                child.p = 0.0
            elif child.p:
                full = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, KeyedDropout(child.p, site_of(full)))
