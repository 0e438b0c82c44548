"""Our PEFT methods in plain PyTorch (fused kernels on GPU via `autopeft.kernels`), and the injector."""

from autopeft.peft.count import ModelDims, head_param_count, peft_param_count
from autopeft.peft.inject import Injected, inject, trainable_state_dict

__all__ = ["Injected", "ModelDims", "head_param_count", "inject", "peft_param_count", "trainable_state_dict"]
