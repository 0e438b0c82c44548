"""Milliseconds per packed training step, grouped adapter terms against the per-segment loop.

A packed step was launch-bound: `PackedLinear` and the adapter hooks ran every trial's terms one segment at a
time, so the step's kernel count grew with the pack size K. The grouped path (`autopeft.packing.GROUPED`,
stacked parameters and batched GEMMs) makes it independent of K. This measures exactly that step, in
isolation from data loading and evaluation (bench/packing.py measures whole trials): one forward under bf16
autocast over the pack's K x batch-size rows, the per-trial losses, one backward, and each trial's own
clipping and AdamW step, as `packing.train_pack` runs it. Arms, on the same pack and the same inputs:

* `loop`: every site per segment (`GROUPED = False`);
* `grouped`: every site that can be, grouped (here all of them: no LoRA dropout);
* `grouped_graphed` (CUDA only): the grouped step's forward, losses and backward as one CUDA graph
  (`autopeft.cuda_graphs.GraphedStep` over static stack gradients, `PackState.make_static`), clipping and AdamW
  outside, as `packing.train_pack` runs a pack under `cuda_graphs` auto;
* `grouped_graphed_fp32_norms` (CUDA only): the same with autocast's fp32 LayerNorm outputs
  (`autopeft.precision.FP32_NORMS`), what the trainer ran before its LayerNorms kept the backbone's bf16;
* `unpacked`: each trial's own model stepped alone on its own rows, summed over the K trials: what K
  one-by-one trials cost for the same work.

The backbone is random (speed does not depend on the weights) at roberta-large size: 24 layers, hidden 1024,
16 heads, FFN 4096 (BERT architecture); the trials are bench/packing.py's SPECS (LoRA at several sites and
ranks, DoRA, IA3), cycled to `--pack-size`; with `--specs floor`, trials without adapters (the pack's floor).

    python bench/packing_step.py --pack-size 8     # GPU
    python bench/packing_step.py --tiny            # CPU smoke run: tiny BERT, seconds; the numbers mean nothing
    python bench/packing_step.py --profile         # + where the grouped and unpacked steps' GPU time goes

Writes bench/results/packing_step-<device>-<date>.json (`packing_step_tiny-...` for --tiny) and prints the
summary last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from common import device_name, format_profile, profile_step, time_cuda, write_results
from packing import SPECS
from torch import nn

from autopeft import packing, precision
from autopeft.cuda_graphs import GraphedStep
from autopeft.packing import _share_frozen, build_packed_model
from autopeft.peft import inject
from autopeft.precision import is_low_precision, keep_norm_dtype
from autopeft.spec import Fidelity, PeftSpec
from autopeft.train import _param_groups, _seed_everything, pick_device


@dataclasses.dataclass
class Trial:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]
    rows: slice


def build(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, packing.PackState, list[Trial]]:
    """The shared backbone made into the pack of `--pack-size` trials, each with its model and optimiser."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    if args.tiny:
        config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=128, num_labels=2)
    else:
        config = BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096, max_position_embeddings=514, num_labels=2)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0  # packed dropout is not the point
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").to(dtype)
    if is_low_precision(dtype):  # as load_backbone does for the trainer
        keep_norm_dtype(base)
    shared = dict(base.named_parameters())
    models, specs = [], []
    for k in range(args.pack_size):
        model = copy.deepcopy(base)
        spec = PeftSpec.from_dict({} if args.specs == "floor" else SPECS[k % len(SPECS)],
                                  num_layers=config.num_hidden_layers)
        _seed_everything(k)
        inject(model, spec)
        _share_frozen(model, shared)
        models.append(model)
        specs.append(spec)
    if args.specs == "floor":  # no trainable tensor before the heads: make backward run down to the embeddings
        base.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    state = build_packed_model(base, models, specs)
    base.to(device).train()
    fid = Fidelity()
    trials = []
    for k, model in enumerate(models):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        model.to(device).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        rows = slice(k * args.batch_size, (k + 1) * args.batch_size)
        trials.append(Trial(model, torch.optim.AdamW(_param_groups(model, fid)), trainable, rows))
    return base, state, trials


def run_arms(args: argparse.Namespace, device: torch.device, arms: list[str]
             ) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, Any]]:
    """Build the pack and time `arms` on it, in order (a grouped arm stacks the pack first): each arm's row, its
    median ms per step, and the graphed arms' `GraphedStep` (key "step"). bench/packing.py runs the graphed arm
    through this too, for its summary's step throughput."""
    base, state, trials = build(args, device)
    k, bs, length = args.pack_size, args.batch_size, args.max_length
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    input_ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (k * bs, length), generator=gen).to(device)
    mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 2, (k * bs,), generator=gen).to(device)
    segments = [(i, i * bs, (i + 1) * bs) for i in range(k)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []

    def update(t: Trial) -> None:
        torch.nn.utils.clip_grad_norm_(t.trainable, 1.0)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)

    def packed_step() -> None:
        state.segments = segments
        with autocast:
            logits = base(input_ids=input_ids, attention_mask=mask).logits
            loss = torch.stack([loss_fn(logits[s:e], labels[s:e]) for _, s, e in segments]).sum()
        loss.backward()
        for t in trials:
            update(t)
        losses.append(loss.detach())

    def unpacked_steps() -> None:
        for t in trials:
            with autocast:
                loss = t.model(input_ids=input_ids[t.rows], attention_mask=mask[t.rows], labels=labels[t.rows]).loss
            loss.backward()
            update(t)
            losses.append(loss.detach())

    graphed: dict[str, Any] = {}

    def graphed_step() -> None:
        """forward + losses + backward replayed as one graph; each trial's clip and AdamW after, in place."""
        loss = graphed["step"]({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
        for t in trials:
            torch.nn.utils.clip_grad_norm_(t.trainable, 1.0)
            t.optimizer.step()
        torch._foreach_zero_(graphed["grads"])  # static gradients: the graph accumulates into them
        losses.append(loss)

    def make_graphed() -> None:
        """`train_pack`'s graphed set-up: static stack gradients handed out once, the layout built before the
        capture, autocast without its cast cache."""
        leaves = state.make_static()
        stacked = state.stacked_params()
        params = leaves + [p for t in trials for p in t.trainable if id(p) not in stacked]
        nocache = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        state.segments = segments
        state.layout(device, k)

        def forward_backward(inp: dict[str, torch.Tensor]) -> torch.Tensor:
            with nocache:
                logits = base(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
                loss = torch.stack([loss_fn(logits[s:e], inp["labels"][s:e]) for _, s, e in segments]).sum()
            loss.backward()
            return loss.detach()

        graphed["step"] = GraphedStep(forward_backward, params)
        graphed["grads"] = [p.grad for p in params]

    rows: list[dict[str, Any]] = []
    ms: dict[str, float] = {}
    for arm in arms:
        if arm.startswith("grouped") and not state.stacks():
            stacked = state.stack()
            print(f"grouped: {stacked} of {len(state.sites)} packed sites stacked", flush=True)
        for t in trials:  # fresh AdamW state, laid out like the parameters as they are now (as in train_pack)
            t.optimizer = torch.optim.AdamW(_param_groups(t.model, Fidelity()))
        precision.FP32_NORMS = arm.endswith("_fp32_norms")  # autocast's fp32 LayerNorms, for comparison
        if arm.startswith("grouped_graphed"):
            make_graphed()
        fn = graphed_step if arm.startswith("grouped_graphed") else {"unpacked": unpacked_steps}.get(arm, packed_step)
        before = (state.grouped, state.looped)
        ms[arm] = time_cuda(fn, warmup=args.warmup, iters=args.iters)
        calls = args.warmup + args.iters
        per_step = ((state.grouped - before[0]) / calls, (state.looped - before[1]) / calls)
        finite = bool(torch.isfinite(torch.stack(losses[-calls:]).float()).all())
        row = {"arm": arm, "ms_per_step": ms[arm], "grouped_calls_per_step": per_step[0],
               "looped_calls_per_step": per_step[1], "losses_finite": finite,
               "tokens_per_s": k * bs * length / (ms[arm] / 1000)}
        if arm.startswith("grouped_graphed"):  # a replay runs no Python: the site calls counted are the capture's
            st = graphed["step"]
            row |= {"graph_captures": st.captures, "graph_replays": st.replays, "graph_failure": st.failure}
        if args.profile and arm in ("grouped", "grouped_graphed", "unpacked"):
            row["profile"] = profile_step(fn, cuda=device.type == "cuda")
            print(f"{arm:9s} {format_profile(row['profile'])}", flush=True)
        rows.append(row)
        print(f"{arm:9s} {ms[arm]:9.1f} ms/step  (site calls per step: {per_step[0]:.0f} grouped, "
              f"{per_step[1]:.0f} per segment; losses finite: {finite})", flush=True)
    precision.FP32_NORMS = False
    state.release()
    return rows, ms, graphed


def parser() -> argparse.ArgumentParser:
    """The command line, whose defaults bench/packing.py's step throughput runs with too."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32, help="rows per trial")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per row (every row full)")
    ap.add_argument("--iters", type=int, default=10, help="timed steps per arm (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-unpacked", action="store_true", help="leave out the one-trial-at-a-time arm")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny BERT, short rows, few steps")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile the grouped, grouped_graphed and unpacked arms: device time per "
                         "step by category (GEMM, attention, optimizer, copies/casts, other) and the top kernels")
    ap.add_argument("--specs", choices=("mixed", "floor"), default="mixed",
                    help="mixed: bench/packing.py's SPECS; floor: trials with no adapter (only their heads train; the "
                         "input gradient still runs down to the embeddings, as an adapter in layer 0 needs), the "
                         "pack's frozen floor (results go to packing_step_floor-*.json)")
    ap.add_argument("--kernels", choices=("auto", "off"), default="auto",
                    help="autopeft.kernels mode: off runs the rescalings (IA3, DoRA's magnitude) as PyTorch's "
                         "broadcasting multiplies instead of the Triton `scale_rows` (auto in CUDA graphs); results "
                         "go to packing_step_kernels_off-*.json")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return ap


def main() -> None:
    args = parser().parse_args()
    from autopeft import kernels

    kernels.set_kernels(args.kernels)
    if args.tiny:
        device = pick_device("cpu")
        args.batch_size, args.max_length = min(args.batch_size, 4), min(args.max_length, 16)
        args.iters, args.warmup = min(args.iters, 3), min(args.warmup, 1)
    else:
        device = pick_device()

    arms = ["loop"] + ([] if args.skip_unpacked else ["unpacked"]) + ["grouped"] + (
        ["grouped_graphed", "grouped_graphed_fp32_norms"] if device.type == "cuda" else [])
    rows, ms, graphed = run_arms(args, device, arms)
    k, bs, length = args.pack_size, args.batch_size, args.max_length

    summary: dict[str, float] = {
        "step_ms_loop": ms["loop"],
        "step_ms_grouped": ms["grouped"],
        "grouped_speedup_vs_loop": ms["loop"] / ms["grouped"],
        "pack_size": k,
    }
    if "unpacked" in ms:
        summary["step_ms_unpacked_total"] = ms["unpacked"]
        summary["grouped_speedup_vs_unpacked"] = ms["unpacked"] / ms["grouped"]
    summary["pack_tokens_per_s_grouped"] = k * bs * length / (ms["grouped"] / 1000)
    if "grouped_graphed" in ms:
        st = graphed["step"]
        summary["packed_graphed"] = float(st.failure is None and st.captures > 0)
        summary["step_ms_grouped_graphed"] = ms["grouped_graphed"]
        summary["graphed_speedup_vs_grouped"] = ms["grouped"] / ms["grouped_graphed"]
        summary["pack_tokens_per_s_grouped_graphed"] = k * bs * length / (ms["grouped_graphed"] / 1000)
        if "unpacked" in ms:
            summary["graphed_speedup_vs_unpacked"] = ms["unpacked"] / ms["grouped_graphed"]
    if "grouped_graphed_fp32_norms" in ms:
        summary["step_ms_grouped_graphed_fp32_norms"] = ms["grouped_graphed_fp32_norms"]
        summary["pack_tokens_per_s_grouped_graphed_fp32_norms"] = (
            k * bs * length / (ms["grouped_graphed_fp32_norms"] / 1000))
        summary["bf16_norms_speedup_graphed"] = ms["grouped_graphed_fp32_norms"] / ms["grouped_graphed"]
    for row in rows:
        if "profile" in row:
            summary |= {f"profile_{row['arm']}_{c}": v for c, v in row["profile"].items() if c.endswith("_ms")}
    what = "tiny BERT (smoke run: the numbers mean nothing)" if args.tiny else "random roberta-large-size BERT"
    trials_are = "trials without adapters (--specs floor)" if args.specs == "floor" else \
        "trials (bench/packing.py SPECS, cycled)"
    notes = (f"{what}; pack of {k} {trials_are}, {bs} rows x {length} tokens each, "
             "bf16 autocast on CUDA; median ms of one training step (forward, backward, per-trial clip + AdamW) "
             f"over {args.iters} steps after {args.warmup} warm-up; unpacked = the K trials' own steps summed; "
             "grouped_graphed (CUDA only) = the grouped step's forward + backward as one CUDA graph (the first "
             "warm-up step captures it; packed_graphed = 1 when it did), clip + AdamW outside; tokens/s = K x rows "
             "x tokens per step (every row full); LayerNorms keep bf16 under autocast (autopeft.precision), "
             "except in grouped_graphed_fp32_norms (autocast's fp32 LayerNorms, the trainer's before 2026-11-30); "
             f"autopeft.kernels mode {args.kernels}; {device_name(device)}")
    name = ("packing_step" + ("_floor" if args.specs == "floor" else "")
            + ("_kernels_off" if args.kernels == "off" else "") + ("_tiny" if args.tiny else ""))
    write_results(name, rows, summary, out_dir=args.out,
                  notes=notes, device=device)


if __name__ == "__main__":
    main()
