"""Issue "fused kernels": the cost of one training step per PEFT method, ours (kernels on and off) vs HF PEFT.

For a roberta-large-sized encoder (batch 32 x 128) and a Llama-1.1B-sized decoder (batch 8 x 1024), random
weights in bf16, it times forward + backward + optimizer step (median over iterations) and records tokens/s
and peak memory for: the floor (frozen backbone, gradient flowing to the input embeddings through every
layer, nothing trained: no PEFT method can be cheaper), full fine-tuning, HF PEFT (LoRA r8/r64 on q,v and on
all linears, with torch.compile, with fast_train_mode where the installed peft has it, DoRA, IA3) and ours
(the same configs plus a serial adapter, each with the Triton kernels on and off).

    python bench/kernels.py                 # GPU: both models, all methods (~15 min on an H100)
    python bench/kernels.py --quick         # a few iterations each: a smoke test on the GPU
    python bench/kernels.py --tiny --quick  # tiny configs on CPU (kernels off): exercises the script only

Writes bench/results/kernels-<device>-<date>.json and prints the summary last. A config that fails (out of
memory, an API the installed peft lacks) gets its error in its row; the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# This file's own folder must not be on sys.path: transformers probes for the hub package `kernels`, and
# would import this very script under that name. `common` is loaded from its path instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("bench_common", _HERE / "common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
device_name, time_cuda, write_results = _common.device_name, _common.time_cuda, _common.write_results

ALL_MODULES = ("q", "k", "v", "o", "ffn_in", "ffn_out")
HF_TARGETS = {
    "roberta": {"qv": ["query", "value"], "all": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"},
    "llama": {"qv": ["q_proj", "v_proj"],
              "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}


@dataclass(frozen=True)
class ModelSetup:
    name: str  # "roberta" or "llama"
    config: Any
    batch: int
    seq: int


def model_setups(tiny: bool) -> list[ModelSetup]:
    from transformers import LlamaConfig, RobertaConfig

    if tiny:
        rob = RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=1000, max_position_embeddings=64, num_labels=2)
        lla = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=1000, max_position_embeddings=64, num_labels=2,
                          pad_token_id=0)
        return [ModelSetup("roberta", rob, 2, 16), ModelSetup("llama", lla, 2, 16)]
    rob = RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    lla = LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, num_labels=2,
                      pad_token_id=0)
    return [ModelSetup("roberta", rob, 32, 128), ModelSetup("llama", lla, 8, 1024)]


def build_model(setup: ModelSetup, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    with torch.device(device):  # weights are created on the device: no host-side init of a 1B model
        model = AutoModelForSequenceClassification.from_config(setup.config, attn_implementation="sdpa")
    return model.to(dtype).train()


# ---- methods: each returns (model, uses_embeds) ready to train ----

def _floor(model: torch.nn.Module, setup: ModelSetup) -> tuple[torch.nn.Module, bool]:
    for p in model.parameters():
        p.requires_grad_(False)
    return model, True


def _full(model: torch.nn.Module, setup: ModelSetup) -> tuple[torch.nn.Module, bool]:
    for p in model.parameters():
        p.requires_grad_(True)
    return model, False


def _hf_lora(r: int, where: str, *, dora: bool = False, compile_: bool = False,
             fast: bool = False) -> Callable[[torch.nn.Module, ModelSetup], tuple[torch.nn.Module, bool]]:
    def make(model: torch.nn.Module, setup: ModelSetup) -> tuple[torch.nn.Module, bool]:
        import peft

        kw: dict[str, Any] = {"task_type": "SEQ_CLS", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
                              "target_modules": HF_TARGETS[setup.name][where], "use_dora": dora}
        if fast:
            if "fast_train_mode" not in inspect.signature(peft.LoraConfig).parameters:
                raise Absent(f"peft {peft.__version__} has no LoraConfig(fast_train_mode=...)")
            kw["fast_train_mode"] = True
        m = peft.get_peft_model(model, peft.LoraConfig(**kw))
        if compile_:
            m = torch.compile(m)
        return m, False

    return make


def _hf_ia3(model: torch.nn.Module, setup: ModelSetup) -> tuple[torch.nn.Module, bool]:
    import peft

    return peft.get_peft_model(model, peft.IA3Config(task_type="SEQ_CLS")), False  # peft's defaults: k, v, ffn


def _ours(spec: dict) -> Callable[[torch.nn.Module, ModelSetup], tuple[torch.nn.Module, bool]]:
    def make(model: torch.nn.Module, setup: ModelSetup) -> tuple[torch.nn.Module, bool]:
        from autopeft.peft import inject
        from autopeft.spec import PeftSpec

        inject(model, PeftSpec.from_dict(spec, setup.config.num_hidden_layers))
        return model, False

    return make


class Absent(Exception):
    """The installed library lacks the feature a config needs: recorded as "absent", not as a failure."""


OUR_SPECS = {
    "lora8_qv": {"lora": {"rank": {"q": 8, "v": 8}}},
    "lora64_qv": {"lora": {"rank": {"q": 64, "v": 64}}},
    "lora8_all": {"lora": {"rank": dict.fromkeys(ALL_MODULES, 8)}},
    "lora64_all": {"lora": {"rank": dict.fromkeys(ALL_MODULES, 64)}},
    "dora8_qv": {"lora": {"rank": {"q": 8, "v": 8}, "dora": True}},
    "serial64": {"serial_adapter": {"size": 64}},
    "ia3": {"ia3": ["k", "v", "ffn_out"]},
}


def methods() -> list[tuple[str, Callable, str | None]]:
    """(name, builder, kernel mode or None for methods that never touch our kernels)."""
    out: list[tuple[str, Callable, str | None]] = [("floor", _floor, None), ("full_ft", _full, None)]
    for r in (8, 64):
        for where in ("qv", "all"):
            out.append((f"hf_lora{r}_{where}", _hf_lora(r, where), None))
    out += [("hf_lora8_qv_compile", _hf_lora(8, "qv", compile_=True), None),
            ("hf_lora8_all_compile", _hf_lora(8, "all", compile_=True), None),
            ("hf_lora8_qv_fast", _hf_lora(8, "qv", fast=True), None),
            ("hf_dora8_qv", _hf_lora(8, "qv", dora=True), None),
            ("hf_ia3", _hf_ia3, None)]
    for key, spec in OUR_SPECS.items():  # "auto" is what the trainer uses; "on" forces every Triton kernel
        out.append((f"ours_{key}", _ours(spec), "auto"))
        out.append((f"ours_triton_{key}", _ours(spec), "on"))
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()
    except Exception:  # dynamo missing or unhappy: nothing to free
        pass


def _training_step(setup: ModelSetup, make: Callable, device: torch.device,
                   dtype: torch.dtype) -> tuple[Callable[[], None], int]:
    """A closure doing one full step (zero grads, forward, backward, AdamW), and the trainable count."""
    model, embeds = make(build_model(setup, device, dtype), setup)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: one launch for all parameters, the fair choice for every method alike
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda") if params else None
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(5, setup.config.vocab_size, (setup.batch, setup.seq), generator=g).to(device)
    labels = torch.randint(0, 2, (setup.batch,), generator=g).to(device)
    if embeds:
        inputs = {"inputs_embeds": model.get_input_embeddings()(ids).detach().requires_grad_(True)}
    else:
        inputs = {"input_ids": ids}

    def step() -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        elif embeds:
            inputs["inputs_embeds"].grad = None
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        if opt is not None:
            opt.step()

    return step, sum(p.numel() for p in params)


def run_one(setup: ModelSetup, name: str, make: Callable, mode: str | None, device: torch.device,
            dtype: torch.dtype, warmup: int, iters: int) -> dict[str, Any]:
    from autopeft import kernels

    row: dict[str, Any] = {"model": setup.name, "method": name, "kernels": mode, "step_ms": None,
                           "ratio_to_floor": None, "tokens_per_s": None, "peak_mem_mb": None,
                           "trainable_params": None, "error": None}
    if mode == "on" and device.type != "cuda":
        row["error"] = "skipped: the Triton kernels need a CUDA device (kernels are off on CPU)"
        return row
    step = None
    try:
        kernels.set_kernels(mode or "off")
        step, row["trainable_params"] = _training_step(setup, make, device, dtype)
        step()  # first call: compilation, autotuning, allocator growth; not in the peak below
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = time_cuda(step, warmup=warmup, iters=iters)
        row["step_ms"] = ms
        row["tokens_per_s"] = setup.batch * setup.seq / (ms / 1e3)
        if device.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Absent as e:
        row["error"] = f"absent: {e}"
    except Exception as e:  # one failing config must not lose the others' numbers
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc(limit=3)
    finally:
        del step  # the closure holds the model and optimizer: drop them before the next config
        _free(device)
        kernels.set_kernels("auto")
    return row


def summarize(rows: list[dict]) -> dict[str, float]:
    summary: dict[str, float] = {}
    by = {(r["model"], r["method"]): r for r in rows}
    for r in rows:
        floor = by.get((r["model"], "floor"), {}).get("step_ms")
        if r["step_ms"] and floor:
            r["ratio_to_floor"] = r["step_ms"] / floor
            summary[f"{r['method']}_ratio_{r['model']}"] = r["ratio_to_floor"]
    for model in sorted({r["model"] for r in rows}):
        for key in OUR_SPECS:
            ours = by.get((model, f"ours_{key}"), {}).get("step_ms")
            triton = by.get((model, f"ours_triton_{key}"), {}).get("step_ms")
            hf = by.get((model, f"hf_{key}"), {}).get("step_ms")
            if ours and hf:
                summary[f"ours_vs_hf_{key}_speedup_{model}"] = hf / ours
            if ours and triton:
                summary[f"triton_vs_auto_{key}_speedup_{model}"] = ours / triton
        fast = by.get((model, "hf_lora8_qv_fast"), {})
        summary[f"hf_fast_train_mode_present_{model}"] = float(bool(fast.get("step_ms")))
    # the keys the issue reads its targets from
    prefix = {"roberta": "roberta_large", "llama": "llama_1b"}
    for model, name in prefix.items():
        ratio = summary.get
        for key, method in (("lora_r8_all_x_floor", "ours_lora8_all"), ("hf_peft_lora_r8_all_x_floor", "hf_lora8_all"),
                            ("adapter64_x_floor", "ours_serial64"), ("ia3_x_floor", "ours_ia3")):
            if ratio(f"{method}_ratio_{model}") is not None:
                summary[f"{name}_{key}"] = ratio(f"{method}_ratio_{model}")
        for key, method in (("hf_peft_compile_lora_r8_all_ms", "hf_lora8_all_compile"),
                            ("lora_r8_all_ms", "ours_lora8_all")):
            ms = by.get((model, method), {}).get("step_ms")
            if ms:
                summary[f"{name}_{key}"] = ms
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few iterations: a smoke test")
    ap.add_argument("--tiny", action="store_true", help="tiny model configs (hidden 64, 2 layers): runs on CPU")
    ap.add_argument("--cpu-smoke", action="store_true", help="same as --tiny --quick on the CPU")
    ap.add_argument("--models", default="roberta,llama", help="comma-separated subset of roberta,llama")
    ap.add_argument("--only", default="", help="comma-separated method names to run (floor is always run)")
    ap.add_argument("--only-llama", default="", help="like --only, for the Llama model alone (time on a lease)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.cpu_smoke:
        args.tiny = args.quick = True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup, iters = (1, 3) if args.quick else (5, 20)
    iters = args.iters or iters
    wanted = {m for m in args.models.split(",") if m}
    only = {m for m in args.only.split(",") if m}
    rows = []
    for setup in model_setups(args.tiny):
        if setup.name not in wanted:
            continue
        for name, make, mode in methods():
            chosen = {m for m in args.only_llama.split(",") if m} if setup.name == "llama" and args.only_llama else only
            if chosen and name not in chosen and name != "floor":
                continue
            row = run_one(setup, name, make, mode, device, dtype, warmup, iters)
            rows.append(row)
            shown = f"{row['step_ms']:.2f} ms" if row["step_ms"] else row["error"]
            print(f"{setup.name:8s} {name:22s} {shown}  peak {row['peak_mem_mb'] or 0:.0f} MiB", flush=True)
        save(rows, args, device, dtype, wanted, warmup, iters)  # after each model: a cut-off run keeps its numbers


def save(rows: list[dict], args: argparse.Namespace, device: torch.device, dtype: torch.dtype, wanted: set[str],
         warmup: int, iters: int) -> None:
    summary = summarize(rows)
    shapes = ", ".join(f"{s.name} {s.batch}x{s.seq}" for s in model_setups(args.tiny) if s.name in wanted)
    write_results("kernels" + ("-tiny" if args.tiny else ""), rows, summary, out_dir=args.out, device=device,
                  notes=f"one training step (fwd+bwd+AdamW), median of {iters} after {warmup} warm-up; "
                        f"random weights, {str(dtype).removeprefix('torch.')}; {shapes}; "
                        f"floor = frozen backbone with grad to inputs_embeds; device {device_name(device)}; "
                        f"ours_* = the trainer's default (kernels auto), ours_triton_* = every Triton kernel on")


if __name__ == "__main__":
    main()
