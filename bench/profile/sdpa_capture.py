"""Which attention kernel PyTorch's SDPA picks inside a CUDA graph capture, against eager, at roberta-large size.

Why: the trainer's graphed step (`autopeft.cuda_graphs.GraphedStep`) of a roberta-large-size encoder did twice the
device work of the eager one in bench/kernels.py's profiles (28 against 13 ms a step for the frozen floor), and
the extra kernels were fp32 GEMMs (`f32f32` in their names, what this flags) and a float softmax: SDPA's math
fallback. This times forward + backward of
SDPA alone, and a 2-layer BERT through transformers (which builds SDPA's mask itself), eager and as a replayed
graph, for each case an encoder's training step can present (padding mask or none, attention dropout or none),
and lists the kernels each ran, so the case that falls back is named.

    python bench/profile/sdpa_capture.py --out DIR      # CUDA only; writes DIR/sdpa_capture-<device>-<date>.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import device_name, write_results

BATCH, HEADS, LENGTH, HEAD_DIM = 32, 16, 128, 64


def case(mask: str, dropout: float) -> tuple[dict[str, torch.Tensor], Any]:
    """Inputs and the step (SDPA forward + backward) for one case."""
    q, k, v = (torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    attn = None
    if mask != "none":  # transformers' 4-D padding mask, broadcast over heads: the last 16 keys of half the rows
        keep = torch.ones(BATCH, 1, LENGTH, LENGTH, dtype=torch.bool, device="cuda")
        keep[: BATCH // 2, :, :, -16:] = False
        attn = keep if mask == "bool" else torch.zeros_like(keep, dtype=torch.bfloat16).masked_fill(~keep, -1e4)
    g = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, dropout_p=dropout)
        out.backward(g)

    return {"q": q, "k": k, "v": v}, step


def model_case(mask: str, dropout: float) -> tuple[dict[str, torch.Tensor], Any]:
    """The same question through transformers: a 2-layer roberta-large-width BERT's forward + backward, with
    `attention_mask` absent, all ones, or padding half the rows (transformers builds SDPA's mask itself, and
    differently while a CUDA graph is being captured: it cannot read the mask's values then)."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    config = BertConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=4096,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").to(
        "cuda", torch.bfloat16).train()
    ids = torch.randint(1000, 20000, (BATCH, LENGTH), device="cuda")
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "labels": torch.zeros(BATCH, dtype=torch.long,
                                                                                device="cuda")}
    if mask != "none":
        am = torch.ones_like(ids)
        if mask == "padded":
            am[: BATCH // 2, -16:] = 0
        inputs["attention_mask"] = am

    def step() -> None:
        model(**inputs).loss.backward()

    return inputs, step


def kernels_of(fn: Any) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
    return [n[:120] for n in names]


def time_ms(fn: Any, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = ap.parse_args()
    rows = []
    cases = [("sdpa", m, p) for m in ("none", "bool", "float") for p in (0.0, 0.1)]
    cases += [("bert", m, p) for m in ("none", "ones", "padded") for p in (0.0, 0.1)]
    for what, mask, dropout in cases:
        _, step = (case if what == "sdpa" else model_case)(mask, dropout)
        row: dict[str, Any] = {"what": what, "mask": mask, "dropout": dropout, "eager_ms": time_ms(step),
                               "eager_kernels": kernels_of(step)}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()
            row |= {"graph_ms": time_ms(graph.replay), "graph_kernels": kernels_of(graph.replay)}
        except RuntimeError as e:
            row["graph_error"] = str(e).splitlines()[0][:200]
        row["graph_math_fallback"] = any("f32f32" in n for n in row.get("graph_kernels", []))
        row["eager_math_fallback"] = any("f32f32" in n for n in row["eager_kernels"])
        print(f"{what} mask {mask:6s} dropout {dropout}: eager {row['eager_ms']:.3f} ms"
              f" (math {row['eager_math_fallback']}), graph {row.get('graph_ms', float('nan')):.3f} ms"
              f" (math {row['graph_math_fallback']}) {row.get('graph_error', '')}", flush=True)
        rows.append(row)
    summary = {f"{r['what']}_{r['mask']}_p{r['dropout']}_graph_math": float(r["graph_math_fallback"]) for r in rows}
    write_results("sdpa_capture", rows, summary, out_dir=args.out, device=torch.device("cuda"),
                  notes=f"SDPA forward + backward, [{BATCH}, {HEADS}, {LENGTH}, {HEAD_DIM}] bf16, default backend "
                        f"choice, eager vs replayed CUDA graph; {device_name(torch.device('cuda'))}")


if __name__ == "__main__":
    main()
