"""Closed-form trainable-parameter counts, from the backbone's config alone.

The search needs a spec's size before building it (for `--max-params` and as an objective), and the tests
hold the injected model to these numbers, so a module that silently grows or shrinks is caught.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopeft.peft.dora import dora_param_count
from autopeft.peft.ia3 import ia3_param_count
from autopeft.peft.lora import lora_param_count
from autopeft.peft.prefix import prefix_param_count
from autopeft.peft.serial_adapter import bottleneck_param_count
from autopeft.spec import PeftSpec


@dataclass(frozen=True)
class ModelDims:
    family: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> ModelDims:
        from autopeft.models import ARCHITECTURES

        family = ARCHITECTURES[config.model_type].family
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(family, config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim)

    def linears(self, module_type: str) -> list[tuple[int, int]]:
        """(in_features, out_features) of each nn.Linear a module type names."""
        h, f, q, kv = self.hidden, self.intermediate, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        table = {"q": [(h, q)], "k": [(h, kv)], "v": [(h, kv)], "o": [(q, h)],
                 "ffn_in": [(h, f)] * (2 if self.family == "llama" else 1), "ffn_out": [(f, h)]}
        return table[module_type]

    def layer_bias_count(self) -> int:
        if self.family == "llama":
            return 0
        # q, k, v, o, ffn_out and two LayerNorms carry `hidden` biases; ffn_in carries `intermediate`
        return 7 * self.hidden + self.intermediate


def head_param_count(model_type: str, hidden: int, num_labels: int) -> int:
    if model_type in ("roberta", "xlm-roberta", "camembert", "electra"):  # dense + out_proj head
        return hidden * hidden + hidden + hidden * num_labels + num_labels
    if model_type == "bert":
        return hidden * num_labels + num_labels
    return hidden * num_labels  # decoder `score`, no bias


def peft_param_count(spec: PeftSpec, dims: ModelDims) -> int:
    """Trainable parameters the spec adds to (or unfreezes in) the backbone; the head not included."""
    total = 0
    for i in range(spec.num_layers):
        for m, ranks in spec.lora.items():
            if ranks[i]:
                per = dora_param_count if spec.dora else lora_param_count
                total += sum(per(fin, fout, ranks[i]) for fin, fout in dims.linears(m))
        for m, flags in spec.ia3.items():
            if flags[i]:
                total += sum(ia3_param_count(fin, fout, m) for fin, fout in dims.linears(m))
        sites = 2 if spec.serial_position == "houlsby" else 1
        if spec.serial_adapter[i]:
            total += sites * bottleneck_param_count(dims.hidden, spec.serial_adapter[i])
        if spec.parallel_adapter[i]:
            total += bottleneck_param_count(dims.hidden, spec.parallel_adapter[i])
        if spec.prefix[i]:
            total += prefix_param_count(spec.prefix[i], dims.num_kv_heads, dims.head_dim, dims.num_heads,
                                        spec.prefix_gate)
        if spec.bitfit[i]:
            total += dims.layer_bias_count()
    return total
