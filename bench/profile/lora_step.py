"""Where a LoRA training step's time goes (ours vs HF PEFT), roberta-large size: torch.profiler top ops.

    python bench/profile/lora_step.py                                  # hf_lora8_all, ours_lora8_all
    python bench/profile/lora_step.py ours_lora8_all_compile floor_compile   # any bench/kernels.py arms
"""
import importlib.util
import sys
from pathlib import Path

import torch

here = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (here, here / "profile")]
spec = importlib.util.spec_from_file_location("kb", here / "kernels.py")
kb = importlib.util.module_from_spec(spec)
sys.modules["kb"] = kb
spec.loader.exec_module(kb)
setup = kb.model_setups(False)[0]
dev = torch.device("cuda")
wanted = sys.argv[1:] or ["hf_lora8_all", "ours_lora8_all"]
for name, make, mode in kb.methods():
    if name not in wanted:
        continue
    from autopeft import kernels
    kernels.set_kernels(mode or "off")
    step, _ = kb._training_step(setup, make, dev, torch.bfloat16, cudagraphs=kb.compile_mode(name) == "_cudagraphs")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as p:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print("=====", name)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
    del step
    kb._free(dev)
