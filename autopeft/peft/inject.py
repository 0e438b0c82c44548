"""Place PEFT modules into a backbone from a `PeftSpec`.

The only function that mutates a model. It freezes the backbone, swaps the named nn.Linear layers for
`PeftLinear` where LoRA/DoRA/IA3 sit (tying those that read one input, q/k/v and gate/up, so they share one
x A^T), hooks adapters onto sub-layer outputs, attaches prefixes to attention modules, unfreezes BitFit biases
and the task head. Everything it adds is named `autopeft_*` so weights can be saved and exported by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import autopeft.dropout as keyed
from autopeft.errors import UserError
from autopeft.kernels import casts
from autopeft.models import architecture_of, get_layers, head_parameters
from autopeft.peft.bitfit import enable_bitfit
from autopeft.peft.count import ModelDims
from autopeft.peft.linear import PeftLinear, share_lora_input
from autopeft.peft.parallel_adapter import ParallelAdapter
from autopeft.peft.prefix import PrefixKV, use_prefix_attention
from autopeft.peft.serial_adapter import SerialAdapter
from autopeft.spec import PeftSpec


@dataclass(frozen=True)
class Injected:
    """What `inject` did, measured on the model itself."""

    trainable_params: int
    head_params: int
    backbone_params: int


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, new)


def inject(model: nn.Module, spec: PeftSpec, *, share_input: bool = True) -> Injected:
    """Mutate `model` in place to carry `spec`; returns the measured parameter counts.

    `share_input` ties the LoRA linears the backbone calls on one input (q/k/v, gate/up; the architecture's
    `shared_input`) so their x A^T is one GEMM; it changes no result, and False exists to test exactly that.
    """
    arch = architecture_of(model)
    layers = get_layers(model)
    if spec.num_layers != len(layers):
        raise UserError(f"spec is for {spec.num_layers} layers but the backbone has {len(layers)}")
    if getattr(model, "autopeft_spec", None) is not None:
        raise UserError("this model already carries an autopeft spec; load a fresh backbone to inject another")
    backbone_params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in head_parameters(model))
    for p in model.parameters():
        p.requires_grad_(False)
    dims = ModelDims.from_config(model.config)
    like = next(model.parameters())
    for i, layer in enumerate(layers):
        for module_type, paths in arch.modules.items():
            rank = spec.lora.get(module_type, (0,) * spec.num_layers)[i]
            ia3 = spec.ia3.get(module_type, (False,) * spec.num_layers)[i]
            if not (rank or ia3):
                continue
            for path in paths:
                base = layer.get_submodule(path)
                _replace(layer, path, PeftLinear(
                    base, module_type, rank=rank, alpha=spec.lora_alpha(rank), dropout=spec.lora_dropout,
                    rslora=spec.lora_rslora, dora=spec.dora, ia3=ia3,
                    dropout_site=keyed.site_of(f"layer{i}.{path}.lora_dropout")))
        if share_input:
            share_lora_input(layer, arch.shared_input)
        if spec.serial_adapter[i]:
            sites = {"ffn": arch.ffn_out}
            if spec.serial_position == "houlsby":
                sites = {"attn": arch.attn_out, **sites}
            for site, path in sites.items():
                adapter = SerialAdapter(dims.hidden, spec.serial_adapter[i], spec.adapter_activation, like)
                layer.add_module(f"autopeft_serial_{site}", adapter)
                layer.get_submodule(path).register_forward_hook(adapter.hook)
        if spec.parallel_adapter[i]:
            adapter = ParallelAdapter(dims.hidden, spec.parallel_adapter[i], spec.adapter_activation,
                                      spec.parallel_scale, like)
            layer.add_module("autopeft_parallel", adapter)
            if arch.ffn_in == arch.ffn_out:
                layer.get_submodule(arch.ffn_out).register_forward_hook(adapter.combined_hook)
            else:
                layer.get_submodule(arch.ffn_in).register_forward_pre_hook(adapter.capture_hook)
                layer.get_submodule(arch.ffn_out).register_forward_hook(adapter.add_hook)
        if spec.prefix[i]:
            attention = layer.get_submodule(arch.attention)
            attention.autopeft_prefix = PrefixKV(spec.prefix[i], dims.num_kv_heads, dims.head_dim,
                                                 dims.num_heads, spec.prefix_gate, like)
        if spec.bitfit[i]:
            enable_bitfit(layer, i)
    for name, p in model.named_parameters():
        if "autopeft_" in name:
            p.requires_grad_(True)
    # every adapter tensor the ops read in the compute dtype, cast once per step; not DoRA's magnitude (read in
    # fp32). Gradients bitwise those of per-use casts on an H200, eager and graphed, prefixes included
    # (bench/profile/step_casts_check.py; bench/results/step_casts_check-h200-2026-11-30.json)
    casts.install(model, [p for name, p in model.named_parameters()
                          if "autopeft_" in name and "dora_magnitude" not in name])
    head = head_parameters(model)
    for p in head:
        p.requires_grad_(True)
    if any(spec.prefix):
        use_prefix_attention(model)
    model.autopeft_spec = spec
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Injected(trainable, sum(p.numel() for p in head), backbone_params)


def trainable_state_dict(model: nn.Module) -> dict:
    """Only what training changed: every trainable tensor, by its name in the model."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
