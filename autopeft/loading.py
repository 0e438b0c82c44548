"""`autopeft.load(base, DIR)`: our own loader, for every spec, including those HF PEFT cannot express.

An export (or a `autopeft train --output` run dir) holds `autopeft.yaml` (the spec) and
`autopeft_weights.safetensors` (every trainable tensor, named as in the injected model). Loading is the
search's own code path run backwards: inject the spec into a fresh backbone, then copy the tensors in, strictly,
so a file that does not fit the spec fails loudly instead of leaving a tensor at its random init.

The module is named `loading` (not `load`) so that `autopeft.load` stays the function: importing a submodule
called `load` would rebind the package attribute to the module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autopeft.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autopeft.spec import PeftSpec

CONFIG_FILE = "autopeft.yaml"
WEIGHTS_FILE = "autopeft_weights.safetensors"
#: head module names of every supported architecture (see models.py); the head is always exported
HEAD_PREFIXES = ("classifier", "score")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (never a pickle), with a clear error when the file is not there."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"weights file {path} is not a readable safetensors file: {exc}") from None


def head_shape(weights: Mapping[str, torch.Tensor]) -> tuple[int, bool]:
    """(num_labels, regression) from the saved head, so a backbone can be built with the right head size.

    The output projection is `classifier.out_proj` (RoBERTa-style), else `classifier` (BERT) or `score`
    (decoders). A single output means a regression head.
    """
    for key in ("classifier.out_proj.weight", "classifier.weight", "score.weight"):
        if key in weights:
            n = int(weights[key].shape[0])
            return n, n == 1
    raise UserError("the weights hold no classification head (classifier.* or score.*); "
                    "they were not written by autopeft")


def load_trainable(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str = "weights") -> None:
    """Copy `weights` into the model's trainable tensors: every one must be there, with its shape, and no more.

    Checked in full before anything is copied, so a mismatch leaves the model untouched.
    """
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))

    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    if missing:
        raise UserError(f"{source} lack {len(missing)} trainable tensor(s) of this spec ({few(missing)}); "
                        "the weights and the spec do not belong together")
    if unexpected:
        raise UserError(f"{source} hold {len(unexpected)} tensor(s) this spec does not train ({few(unexpected)}); "
                        "the weights and the spec do not belong together")
    wrong = [f"{n} {tuple(weights[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
             if tuple(weights[n].shape) != tuple(p.shape)]
    if wrong:
        hint = ""
        if any(n.startswith(HEAD_PREFIXES) for n in params if tuple(weights[n].shape) != tuple(params[n].shape)):
            hint = f"; the head has another size: build the base with num_labels={head_shape(weights)[0]}"
        raise UserError(f"{source}: shape mismatch for {few(wrong)}{hint}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n].to(device=p.device, dtype=p.dtype))


def build(base_model: nn.Module, spec: PeftSpec, weights: Mapping[str, torch.Tensor],
          source: str = "weights") -> nn.Module:
    """Inject `spec` into a fresh `base_model` and load `weights` strictly; the model is returned in eval mode.

    Injection draws random initial values, which are all overwritten; the caller's RNG state is left as it was.
    """
    import torch

    from autopeft.peft import inject

    with torch.random.fork_rng(devices=[]):
        inject(base_model, spec)
    load_trainable(base_model, weights, source)
    return base_model.eval()


def read_export(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The parsed `autopeft.yaml` of an export dir, and the path of its weights."""
    from autopeft.yamlio import load_yaml

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; give the directory `autopeft export` or `autopeft train "
                        "--output` wrote")
    if not (root / CONFIG_FILE).is_file():
        raise UserError(f"{root} has no {CONFIG_FILE}; it is not an autopeft export")
    cfg = load_yaml(root / CONFIG_FILE, "export config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("spec"), Mapping):
        raise UserError(f"{root / CONFIG_FILE} has no spec: mapping")
    return dict(cfg), root / WEIGHTS_FILE


def load(base_model: nn.Module | str | os.PathLike | None, path: str | os.PathLike) -> nn.Module:
    """Our model from an export dir: `base_model` (a fresh, unmodified backbone) with the spec and weights in it.

    `base_model` may be the model itself, or a backbone name/dir (`minilm`, a hub id, a local dir), or None for
    the backbone named in `autopeft.yaml`; a name is loaded with the head size the saved head has. The model is
    changed in place and returned in eval mode.
    """
    from autopeft.spec import PeftSpec

    cfg, weights_path = read_export(path)
    weights = read_weights(weights_path)
    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        from autopeft.models import load_backbone

        num_labels, regression = head_shape(weights)
        regression = bool((cfg.get("data") or {}).get("regression", regression))
        base_model, _ = load_backbone(base_model or cfg.get("backbone"), num_labels, regression=regression)
    num_layers = getattr(getattr(base_model, "config", None), "num_hidden_layers", None)
    spec = PeftSpec.from_dict(cfg["spec"], num_layers=num_layers)
    return build(base_model, spec, weights, source=str(weights_path))
