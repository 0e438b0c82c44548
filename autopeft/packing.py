"""Trial packing: several trials trained at once on one shared, frozen backbone.

A search trial on an encoder is small: the frozen backbone is almost all of the work and all of the memory,
and every trial of a study uses the same one. So K trials can share it: each step, the K trials' micro-batches
are concatenated into one packed batch (padded to the widest), every frozen GEMM runs once over the whole pack,
and only the adapter terms are computed per trial, on that trial's rows ("segments"), as multi-LoRA systems do
(Punica and S-LoRA for serving, mLoRA/ASPEN for training). Everything else stays per trial and fully
independent: its own data order (the very seeded batches `train.run_trial` would draw), loss (the sum of the
per-trial mean losses is back-propagated once; the parameters are disjoint and every backbone op is row-wise,
so each trial's gradient is exactly its own), AdamW with its per-method groups, warm-up + linear decay, gradient
clipping over its own parameters, step count, metrics. A trial whose loss turns non-finite leaves the pack
(`TrialFailed("nan")` for it) and the others go on.

How a pack is built, so that packed and sequential training are the same computation:

* Each trial gets its own model exactly as `run_trial` makes it (seed, load, seed, `inject`), so adapter and
  head initialisation match bit for bit; then every frozen parameter of it is swapped for the shared
  backbone's tensor, so a trial costs only its trainable tensors. That per-trial model is what evaluation runs
  and what `TrialResult.model` returns (export and saving work unchanged).
* The packed model is the shared backbone with, at each site some trial adapts, a segmented module:
  `PackedLinear` (one base GEMM over the pack, then the trials' LoRA / DoRA / IA3 / BitFit-bias terms with the
  math of `autopeft.kernels.reference`), `SegmentedModule` (per segment, the trial's own module: BitFit
  LayerNorms, the classification heads), forward hooks applying the trials' serial / parallel adapters
  (`_AdapterSite`), and an attention function that runs each segment with its trial's prefix (attention is
  per example anyway, so segmenting it costs launches, not FLOPs).
* The adapter terms of `PackedLinear` and the adapter hooks run grouped: a fixed number of batched ops per
  site, whatever the pack size. Per segment (a Python loop over slices, kept as the reference and the
  fallback) they were what bounded a pack: measured on an H200, 8 packed trials ran 1.4x the trials per
  GPU-hour of one-by-one training on MiniLM and only 1.05x on a roberta-large-size encoder, whose packed step
  (24 layers x up to 6 linears x 8 segments of launches, forward and backward) took 500 ms, as long as 8
  unpacked steps. Grouped, that step took 258 ms against 434 ms looped (198 ms graphed since `_fresh` and
  `kernels.scale_rows`, see `_grouped`), and packs of 8 run 2.8x (MiniLM) and
  3.0x (roberta-large size) HF PEFT's trials per GPU-hour (H200, 2026-11-29, bench/results/packing*-h200-*.json;
  bench/packing_step.py times a step both ways). What still grows with K is listed below. Grouping needs
  a site's K parameters side by side: each term is one fp32 tensor [K, widest...] (`_Stack`) of which each
  trial's parameter is a view, so its own model, AdamW, clipping and evaluation are untouched, and after
  backward the stack's gradient is handed to the trials' parameters. Padding (ranks and bottlenecks narrower
  than the widest, trials without the term) belongs to no trial, is never written and contributes exact
  zeros, so grouped and per-segment training agree to rounding. Rows go in chunks of gcd(segment sizes)
  (`PackState.layout`), so unequal segments (a short last batch, trials of other batch sizes) group too,
  without copying activations. A trial leaving the pack gets its parameters back as tensors of its own
  (`PackState.release`; safetensors saves no views). Still per segment: sites with LoRA dropout (each trial
  draws its own masks, keyed by its rows as alone), prefix attention and the `SegmentedModule`s.

In a graphed step on a GPU, a grouped linear site with LoRA goes one step further (`PackedLinear._folded`,
`kernels.grouped_fold`): each trial's update is folded into a weight of its own, W'_k = W + s B_k A_k, so the
forward is one GEMM per trial (the bias in cuBLAS's epilogue) and the input gradient one batched GEMM, with nothing
added over the activations; IA3's and DoRA's rescalings touch only the rows of the trials that have them, and A's
and B's gradients are computed only over the rows of the trials with LoRA at that site. At roberta-large size a
pack of 8 then steps at 264k tokens/s against 191k (H200; bench/results/packing-h200-2026-11-30.json and
packing_step_nofold-): the unfolded grouped path stays for eager steps, CPUs, and layouts whose chunks gather.

On CUDA the packed step runs as CUDA graphs (`Fidelity.cuda_graphs`, auto/on/off, shared by the pack's
trials), as an unpacked trial's does (`autopeft.cuda_graphs`): a pack of 8 was host-bound (258 ms a step at
roberta-large size, H200) and lost to graphed unpacked trials (1,671 against 950 trials per GPU-hour, MiniLM
2,381 against 818; bench/results/packing*-h200-2026-11-30.json). The eager step breaks a capture's rules in
four places, and the graphed path (`_static_steps`) changes each: the losses are read on the host one step
late instead of between forward and backward, and the backward's root is the sum of every trial's loss
(a NaN reaches only its own trial: see `_static_step_fn`); the stacks' gradients go to static buffers whose
views are the trials' `.grad`s, set once (`_Stack.make_static`), instead of being handed out by a hook; the
layout of a composition is built before the step and kept (`PackState.layout`); and every trial's rows are
padded to one bucket length, with one graph runner per composition, captured anew when a trial leaves. The
eager path (`_eager_steps`) stays as it was: the reference, and what runs with graphs off or on a CPU.

Dropout draws the same masks packed and alone: the backbone's dropouts and LoRA's are keyed by trial seed, step
and row (`autopeft.dropout`; each step's keys go with the pack's rows, `_pack_keys`, and a trial's own modules
take its rows' keys, `dropout.narrowed`), and attention's dropout, which SDPA draws where no key reaches, is off
in both. Every method packs, with one caveat: `peak_memory_mb` of a packed trial is measured on one standalone
step of that trial on the shared backbone (see `_probe_memory`), since the pack's own peak belongs to all of
its trials (it is reported as `PackStats.peak_memory_mb`).

Wired into the search: with `--pack-size K` (`autopeft search`, and every `autopeft worker` of the study),
`worker.work` asks K trials at once (BoTorch proposes them as one q-batch: `sampler.make_sampler(batch=)`),
`search.pack_objective` trains them with `train_pack` and each trial is told its own result. K is the
study's setting, or with `--pack-size auto` what the device's memory holds (`autopeft.pack_size`: estimated,
then measured from each pack's `PackStats`).
"""

from __future__ import annotations

import functools
import math
import random
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autopeft import dropout, kernels
from autopeft.cuda_graphs import GraphedStep, StaticGradients, _key, bucket_length, use_cuda_graphs
from autopeft.errors import TrialFailed, UserError
from autopeft.kernels import grouped_fold
from autopeft.kernels.reference import ACTIVATIONS, _add_low_rank, _cast, _chunk_rows, compute_dtype
from autopeft.models import architecture_of, get_layers, is_causal, resolve_backbone
from autopeft.peft import inject
from autopeft.peft.linear import PeftLinear
from autopeft.peft.prefix import PrefixKV, prefix_attention
from autopeft.spec import Metrics, PeftSpec
from autopeft.tasks import TaskData
from autopeft.train import (
    CURRENT_TRIAL,
    FAULT_ENV,
    LaggedLoss,
    PeakMemory,
    TrialConfig,
    TrialResult,
    _graphs_failed,
    _memory_at_failure,
    _null,
    _param_groups,
    _seed_everything,
    collate,
    evaluate,
    injected_fault,
    length_bucketed_batches,
    pick_device,
    seeded_backbone,
    tokenize,
    trial_splits,
)

PACKED_ATTENTION = "autopeft_packed"

#: run the adapter terms of a pack grouped over its trials (stacked parameters, batched GEMMs) wherever they can
#: be; False keeps every site on the per-segment loop (the reference the grouped path is tested against, and the
#: baseline bench/packing_step.py measures it against). Read when a pack is stacked (`PackState.stack`).
GROUPED = True


# ----- the segments of a packed batch -------------------------------------------------------------------------
class PackState:
    """Which rows of the current packed batch belong to which trial slot, shared by every packed module.

    `segments` is a list of (slot, start, stop), contiguous and in row order, covering the whole batch.
    `captured` carries a block's input from a pre-hook to the post-hook of a parallel adapter. `sites` are the
    packed modules and adapter hooks, which `stack` / `release` move in and out of the grouped layout;
    `grouped` and `looped` count their forward calls by path (how a test or a benchmark knows which ran).
    """

    def __init__(self) -> None:
        self.segments: list[tuple[int, int, int]] = []
        self.captured: dict[int, torch.Tensor] = {}
        self.sites: list[Any] = []
        self.grouped = 0
        self.looped = 0
        self._layouts: dict[tuple, tuple[int, torch.Tensor | None] | None] = {}

    def layout(self, device: torch.device, slots: int) -> tuple[int, torch.Tensor | None] | None:
        """The current batch as G equal chunks of rows, each inside one segment, for batched GEMMs: (G, the slot
        of each chunk as an index tensor on `device`, or None when chunk g is slot g for all `slots` slots, the
        usual case of every trial active with one batch size). Chunks are gcd(segment sizes) rows, so segments
        of unequal size (a trial's short last batch, trials of other batch sizes) still group, in more and
        smaller chunks, with no copy of the activations. None for an empty batch.

        Built once per composition of segments and kept until the pack is released, never evicted: a CUDA graph
        captured on a composition reads its index tensor by address at every replay, so the tensor must outlive
        the graph, and it must exist before the capture (its host-to-device copy cannot be captured).
        `train_pack`'s graphed path calls this before each step, outside the captured region. A pack sees few
        compositions (the active set changes only when trials leave; short last batches add one each), and
        each entry is one small index tensor.

        `device` "cuda" (no index, as `pick_device` gives) is keyed as the current device, what the packed
        modules' `x.device` says inside the forward: otherwise the layout built before the step would be
        another key's, and the forward would build its own."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (tuple(self.segments), device, slots)
        if key not in self._layouts:
            sizes = [e - s for _, s, e in self.segments]
            rows = math.gcd(*sizes) if sizes else 0
            if rows == 0:
                self._layouts[key] = None
            else:
                owner = [k for k, s, e in self.segments for _ in range((e - s) // rows)]
                idx = None if owner == list(range(slots)) else torch.tensor(owner, device=device)
                self._layouts[key] = (len(owner), idx)
        return self._layouts[key]

    def stack(self) -> int:
        """Put every site that can run grouped into the grouped layout (its trials' parameters become views of
        stacked tensors, see `_Stack`); call once the trials' parameters are on their device, in fp32, with
        their optimisers made. Returns how many sites did."""
        return sum(bool(site.stack()) for site in self.sites)

    def release(self, slot: int | None = None) -> None:
        """Give trial `slot` (every trial when None) its parameters back as tensors of its own, so that nothing
        it holds is a view of a stack (safetensors refuses to save views into a larger storage, and a finished
        trial should not pin the pack's stacks). A released slot runs the per-segment loop if it is ever in a
        batch again; with every slot released the stacks are freed."""
        for site in self.sites:
            site.release(slot)
        if slot is None:
            self._layouts.clear()

    def stacks(self) -> list[_Stack]:
        """Every stack of every grouped site."""
        return [s for site in self.sites for s in site.stacks()]

    def make_static(self) -> list[torch.Tensor]:
        """Static gradients for the graphed step (`_Stack.make_static`): every trainable stack gets a zero `.grad`
        that backward accumulates into in place, and its trials' parameters get views of it as their `.grad`,
        once. Returns those stacks' leaves (the tensors a `GraphedStep` keeps the gradients of)."""
        leaves = []
        for s in self.stacks():
            if s.views:
                s.make_static()
                leaves.append(s.leaf)
        return leaves

    def stacked_params(self) -> set[int]:
        """ids of the trials' parameters that are views of a stack (their gradients come from the stack's)."""
        return {id(p) for s in self.stacks() for p, _ in s.views.values()}


class _Stack:
    """One term (LoRA's A, a bias, ...) of every slot of a packed site, in one fp32 leaf tensor [K, *widest]
    padded with `fill`, so that one batched op computes it for all trials.

    A slot's trainable parameter becomes a view of its region (transposed for `transpose` stacks, which hold
    [out, r] parameters as [r, out] so that the region is a dense block): the trial's own model, optimiser,
    clipping and evaluation keep seeing an ordinary parameter, while the pack's forward reads the stack. After
    backward the stack's gradient is handed to each parameter as the view of its region, with the parameter's
    own strides (so AdamW's and clipping's foreach kernels stay on their fast path): per-trial optimisation is
    unchanged and exact. Padding belongs to no trial, so no optimiser ever writes it and it keeps `fill`; the
    grouped ops are arranged so that padding contributes exactly nothing (zeros in a GEMM's reduction, ones in a
    product). Frozen entries (a trial's shared, frozen bias) are copies.
    """

    def __init__(self, tensors: Sequence[torch.Tensor | None], fill: float, device: torch.device,
                 transpose: bool = False) -> None:
        stored = [None if t is None else (t.t() if transpose else t) for t in tensors]
        present = [t for t in stored if t is not None]
        shape = tuple(max(t.shape[d] for t in present) for d in range(present[0].dim()))
        self.transpose = transpose
        self.leaf = torch.full((len(tensors), *shape), fill, dtype=torch.float32, device=device)
        self.dtype = functools.reduce(torch.promote_types, [t.dtype for t in present])  # the tensors' own
        self.views: dict[int, tuple[nn.Parameter, tuple]] = {}
        self.used: set[int] = set()  # slots in a forward since the last backward: only they get a gradient
        self.static = False  # gradients in a static buffer (`make_static`), not handed out after backward
        with torch.no_grad():
            for k, (t, s) in enumerate(zip(tensors, stored, strict=True)):
                if t is None:
                    continue
                region = (k, *(slice(0, n) for n in s.shape))
                self.leaf[region] = s
                if isinstance(t, nn.Parameter) and t.requires_grad:
                    view = self.leaf.detach()[region]
                    t.data = view.t() if transpose else view
                    self.views[k] = (t, region)
        if self.views:
            self.leaf.requires_grad_(True)
            # through a weak reference: a hook holding the stack would make leaf -> hook -> stack -> leaf a cycle
            # through the tensor's C++ side, which Python's collector cannot see, so every pack's stacks (GPU
            # memory) would outlive it
            ref = weakref.ref(self)
            self.leaf.register_post_accumulate_grad_hook(lambda leaf: _hand_out_of(ref, leaf))

    def make_static(self) -> None:
        """The graphed step's gradients: a zero `leaf.grad` that backward accumulates into in place (autograd
        does, for a leaf whose `.grad` exists), and each slot's parameter given the view of its region as its
        `.grad` (with the parameter's strides), once, instead of after every backward by `_hand_out` (a Python
        hook a graph's replay would not run). Zero it in place after the optimizer steps; a slot absent from a
        step gets zeros there, which its optimiser never reads (only trials in the step are stepped)."""
        if self.static or not self.views:
            return
        self.leaf.grad = torch.zeros_like(self.leaf)
        for p, region in self.views.values():
            g = self.leaf.grad[region]
            p.grad = g.t() if self.transpose else g
        self.static = True

    def _hand_out(self, leaf: torch.Tensor) -> None:
        if self.static:  # the gradient stays in the static buffer the parameters' .grad views
            self.used.clear()
            return
        grad, leaf.grad = leaf.grad, None
        used, self.used = self.used, set()
        for k, (p, region) in self.views.items():
            if k not in used:  # as autograd leaves a parameter no forward used: without a gradient
                continue
            g = grad[region].t() if self.transpose else grad[region]
            p.grad = g if p.grad is None else p.grad + g

    def release(self, slot: int | None) -> None:
        for k in list(self.views) if slot is None else [slot]:
            entry = self.views.pop(k, None)
            if entry is not None:
                if self.static:  # its .grad is a view of the static buffer: a trial that left needs none
                    entry[0].grad = None
                entry[0].data = entry[0].data.clone(memory_format=torch.contiguous_format)
        if slot is None and self.static:
            self.leaf.grad = None
            self.static = False


def _hand_out_of(ref: weakref.ref, leaf: torch.Tensor) -> None:
    stack = ref()
    if stack is not None:
        stack._hand_out(leaf)


def _fresh(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` reshaped, as a tensor autograd does not treat as a view of `t` (what `torch.matmul` returns for a
    3-D by 2-D product): ops may then update it in place without autograd's CopySlices, which in backward
    would zero, clone and copy the whole activation. Only for a `t` that nothing saves for backward (a GEMM's
    fresh output), since the two do not share a version counter."""
    return torch.ops.aten._unsafe_view(t, shape)


def _chunk_bmm(acc: torch.Tensor | None, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor | None,
               alpha: float = 1.0, in_place: bool = False, transpose: bool = False) -> torch.Tensor:
    """acc + alpha * x @ W[slot of each chunk] (without acc: x @ W[...]) in x's dtype, x [G, T, a] and W [K, a, b]
    the per-slot weights, which are `w`, or `w` [K, b, a] transposed: `bmm` / `baddbmm` when chunk g is slot g,
    else `_GatheredBmm`."""
    if idx is None:
        w = w.to(x.dtype)
        w = w.transpose(1, 2) if transpose else w
        if acc is None:
            return torch.bmm(x, w)
        return acc.baddbmm_(x, w, alpha=alpha) if in_place else torch.baddbmm(acc, x, w, alpha=alpha)
    return _GatheredBmm.apply(acc, x, w, idx, alpha, transpose)


class _GatheredBmm(torch.autograd.Function):
    """`_chunk_bmm` with chunks gathering their slot's weights, without keeping the gathered [G, a, b] copy for
    backward (autograd's `index_select` + `bmm` would): with chunks of a row or a few, that copy is as large
    as the activations it multiplies. Backward gathers again and sums the chunks' weight gradients per slot
    in w's dtype (fp32: the stacks'), not in the compute dtype."""

    @staticmethod
    def forward(ctx: Any, acc: torch.Tensor | None, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
                alpha: float, transpose: bool) -> torch.Tensor:
        wg = w.to(x.dtype).index_select(0, idx)
        wg = wg.transpose(1, 2) if transpose else wg
        ctx.save_for_backward(x, w, idx)
        ctx.alpha, ctx.has_acc, ctx.transpose = alpha, acc is not None, transpose
        return torch.bmm(x, wg) if acc is None else torch.baddbmm(acc, x, wg, alpha=alpha)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, idx = ctx.saved_tensors
        gs = g if ctx.alpha == 1.0 else g * ctx.alpha
        gx = gw = None
        if ctx.needs_input_grad[1]:
            wg = w.to(g.dtype).index_select(0, idx)
            gx = torch.bmm(gs, wg if ctx.transpose else wg.transpose(1, 2))
        if ctx.needs_input_grad[2]:
            per_chunk = torch.bmm(x.transpose(1, 2).to(g.dtype), gs)  # [G, a, b]
            per_chunk = per_chunk.transpose(1, 2) if ctx.transpose else per_chunk
            gw = torch.zeros_like(w).index_add_(0, idx, per_chunk.to(w.dtype))
        return (g if ctx.has_acc else None), gx, gw, None, None, None


def _slice(t: torch.Tensor | None, start: int, stop: int, rows: int) -> torch.Tensor | None:
    """Rows [start, stop) of a per-example tensor; a tensor broadcast over the batch (dim 0 of 1) stays whole."""
    if t is None or t.dim() == 0 or t.shape[0] != rows:
        return t
    return t[start:stop]


class PackedLinear(nn.Module):
    """A frozen nn.Linear shared by K trials, each of which may carry LoRA / DoRA / IA3 / a BitFit bias here.

    The frozen GEMM x W^T runs once over the whole pack (after IA3 input scaling, which is per trial). The
    trials' terms then run grouped (`stack`, `_grouped`): a constant number of batched ops whatever K is, the
    per-trial differences living in stacked, padded parameters. Where a site cannot be grouped (per-trial
    LoRA dropout, a released slot) they run per segment (`_loop`) with the exact operations of
    `autopeft.kernels.reference`, so a pack of one is the unpacked computation; the grouped path is tested
    against that loop. `slots[k]` is trial k's own module at this path (a `PeftLinear`, or the plain nn.Linear
    whose bias BitFit may train); their weights are the shared one.
    """

    def __init__(self, base: nn.Linear, slots: Sequence[nn.Module], state: PackState) -> None:
        super().__init__()
        self.base_layer = base
        self.slots = nn.ModuleList(slots)
        self.state = state
        self.in_features, self.out_features = base.in_features, base.out_features
        # the bias joins the shared GEMM only when every trial uses the frozen one and none is DoRA (whose bias
        # comes after the magnitude rescaling); otherwise each segment adds its own, as the reference would
        self.own_bias = any(self._bias(m) is not base.bias or (isinstance(m, PeftLinear) and m.dora)
                            for m in slots)
        self.scales_input = any(isinstance(m, PeftLinear) and m.ia3 == "in" for m in slots)
        # LoRA and bias terms can accumulate straight into the shared output (no per-segment copy and cat); DoRA
        # and IA3 on the output rescale it, which autograd needs out of place
        self.in_place = not any(isinstance(m, PeftLinear) and (m.dora or m.ia3 == "out") for m in slots)
        self._stacks: dict[str, _Stack] | None = None
        self._released: set[int] = set()
        state.sites.append(self)

    @staticmethod
    def _bias(m: nn.Module) -> torch.Tensor | None:
        return m.base_layer.bias if isinstance(m, PeftLinear) else m.bias

    def _peft(self, k: int) -> PeftLinear | None:
        m = self.slots[k]
        return m if isinstance(m, PeftLinear) else None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = self.state.segments
        if not segments or segments[-1][2] != x.shape[0]:
            raise RuntimeError("PackedLinear called without segments covering the batch (set PackState.segments)")
        if self._stacks is not None and not any(k in self._released for k, _, _ in segments):
            layout = self.state.layout(x.device, len(self.slots))
            if layout is not None:
                self.state.grouped += 1
                return self._grouped(x, *layout)
        self.state.looped += 1
        x = self._input(x)
        z = F.linear(x, _cast(self.base_layer.weight, x), None if self.own_bias else _cast(self.base_layer.bias, x))
        return self._accumulate(x, z) if self.in_place else self._loop(x, z)

    # ----- grouped: every trial at once ---------------------------------------------------------------------
    def stack(self) -> bool:
        """Move this site's trainable terms into stacks (`_Stack`); False where the site stays on the loop:
        per-trial LoRA dropout (one mask per trial, as sequential training draws them)."""
        pefts = [self._peft(k) for k in range(len(self.slots))]
        if self._stacks is not None or any(p is not None and p.rank and p.dropout for p in pefts):
            return False
        dev = self.base_layer.weight.device
        ranks = [p.rank if p is not None else 0 for p in pefts]
        st: dict[str, _Stack] = {}
        if any(ranks):
            st["A"] = _Stack([p.autopeft_lora_A if r else None for p, r in zip(pefts, ranks, strict=True)], 0.0, dev)
            st["Bt"] = _Stack([p.autopeft_lora_B if r else None for p, r in zip(pefts, ranks, strict=True)], 0.0,
                              dev, transpose=True)
            scalings = [p.scaling if r else 0.0 for p, r in zip(pefts, ranks, strict=True)]
            used = {s for s, r in zip(scalings, ranks, strict=True) if r}
            # one scaling for every trial (the usual alpha = ratio * r) is the GEMM's alpha, as in the reference;
            # otherwise each trial's B is scaled in its stack
            self._alpha = used.pop() if len(used) == 1 else None
            self._scalings = torch.tensor(scalings, device=dev).view(-1, 1, 1)
        dora = [k for k, p in enumerate(pefts) if p is not None and p.dora]
        if dora:
            st["magnitude"] = _Stack([p.autopeft_dora_magnitude if p is not None and p.dora else None
                                      for p in pefts], 1.0, dev)
            self._dora = torch.tensor(dora, device=dev)
            used = {pefts[k].scaling for k in dora}
            self._dora_alpha = used.pop() if len(used) == 1 else None
            self._dora_scalings = torch.tensor([pefts[k].scaling for k in dora], device=dev).view(-1, 1, 1)
            # the bias goes before the LoRA term for LoRA trials, after the rescaling for DoRA trials
            self._after = torch.tensor([float(k in dora) for k in range(len(pefts))], device=dev).view(-1, 1)
            self._before = 1 - self._after
        # for `_folded`: which trials' bias goes before their rescaling, and whose rows are rescaled at all
        self._bias_before = tuple(k not in dora for k in range(len(pefts))) if dora else None
        self._out_slots = tuple(k for k, p in enumerate(pefts) if p is not None and (p.dora or p.ia3 == "out"))
        self._in_slots = tuple(k for k, p in enumerate(pefts) if p is not None and p.ia3 == "in")
        self._lora_slots = tuple(k for k, r in enumerate(ranks) if r)
        for side in ("in", "out"):
            vectors = [p.autopeft_ia3 if p is not None and p.ia3 == side else None for p in pefts]
            if any(v is not None for v in vectors):
                st[f"ia3_{side}"] = _Stack(vectors, 1.0, dev)
        biases = [self._bias(m) for m in self.slots]
        if self.own_bias and any(b is not None for b in biases):
            st["bias"] = _Stack(biases, 0.0, dev)
        # under autocast a trial's output has its GEMMs' dtype, except that DoRA adds its bias last, out of place
        # (`reference.dora_linear`), so an fp32 bias promotes it; the pack's output, like a `cat`, is the promotion
        self._promotes = {k: b.dtype for k, (p, b) in enumerate(zip(pefts, biases, strict=True))
                          if b is not None and p is not None and p.dora}
        self._stacks = st
        return True

    def stacks(self) -> list[_Stack]:
        return list(self._stacks.values()) if self._stacks is not None else []

    def release(self, slot: int | None = None) -> None:
        if self._stacks is None:
            return
        for s in self._stacks.values():
            s.release(slot)
        if slot is None:
            self._stacks = None
            self._released.clear()
        else:
            self._released.add(slot)

    def _grouped(self, x: torch.Tensor, chunks: int, idx: torch.Tensor | None) -> torch.Tensor:
        """The loop's math for all segments at once: the batch as `chunks` equal chunks of rows of one trial each
        (`PackState.layout`), per-trial vectors gathered per chunk and broadcast, LoRA as two batched GEMMs
        (x A^T, then accumulated into the shared output, as `reference._add_low_rank` does with addmm).
        Trials without a term get its identity (zero LoRA rows, IA3 and scale of one, bias of zero), which
        leaves their rows exactly as the loop would.

        Every pass over the pack's activations counts here: at roberta-large size a pack of 8 is 32k tokens,
        and its step was bound by elementwise work, not GEMMs (bench/packing_step.py --profile). So the frozen
        GEMM's output is taken as a tensor of its own (`_fresh`), into which the bias and the LoRA term add in
        place, for every site (in place on a view, autograd's CopySlices would copy the activation four times in
        backward); and the per-trial rescalings (DoRA's magnitude, IA3 on the output) and DoRA's bias after them
        are one multiply-add, (y * d + b) * l as y * (d l) + b l (`kernels.scale_rows`, a Triton kernel in CUDA graphs),
        instead of three passes."""
        st = self._stacks
        present = {k for k, _, _ in self.state.segments}
        if torch.is_grad_enabled():
            for s in st.values():
                s.used |= present
        autocast = torch.is_autocast_enabled(x.device.type)
        shape = x.shape
        x3 = x.reshape(chunks, -1, shape[-1])
        if idx is None and "A" in st and kernels.folds(x, "grouped_lora_linear"):
            y = self._folded(x3, autocast, present)
            if y is not None:
                return y.view(*shape[:-1], y.shape[-1])
        if "ia3_in" in st:
            x3 = kernels.scale_rows(x3, st["ia3_in"].leaf.to(x.dtype), None, idx)
        x_dtype = x3.dtype
        if autocast:  # one cast of x that the base GEMM and x A^T share (autocast would cast it for each)
            x3 = x3.to(compute_dtype(x3))
        z = F.linear(x3.reshape(-1, shape[-1]), _cast(self.base_layer.weight, x3),
                     None if self.own_bias else _cast(self.base_layer.bias, x3))
        y = _fresh(z, (chunks, -1, z.shape[-1]))
        dtype = y.dtype
        if autocast and not self.in_place:
            for k, d in self._promotes.items():
                dtype = torch.promote_types(dtype, d) if k in present else dtype
        bias = None
        if "bias" in st:
            bias = st["bias"].leaf.to(st["bias"].dtype if autocast else x_dtype)
            before = bias if "magnitude" not in st else bias * self._before.to(bias.dtype)
            y.add_(_chunk_rows(before, idx))  # rounded to y's dtype, as the loop's `(y + b).to(y.dtype)`
        if "A" in st:
            Bt = st["Bt"].leaf if self._alpha is not None else st["Bt"].leaf * self._scalings
            xa = _chunk_bmm(None, x3, st["A"].leaf, idx, transpose=True)
            y = _chunk_bmm(y, xa, Bt, idx, 1.0 if self._alpha is None else self._alpha, in_place=True)
        scale, shift = self._rescaling(x_dtype, y.dtype, bias)
        if scale is not None:  # an fp32 bias promotes the output, as the loop's `y + b` does
            y = kernels.scale_rows(y, scale, shift, idx)
        y = y.view(*shape[:-1], y.shape[-1])
        return y if y.dtype == dtype else y.to(dtype)

    def _folded(self, x3: torch.Tensor, autocast: bool, present: set[int]) -> torch.Tensor | None:
        """`_grouped`'s math with each trial's LoRA folded into a weight of its own (`kernels.grouped_fold`): what
        "auto" runs in a graphed step on CUDA when every trial's rows are one chunk of the pack. None where the
        output would be promoted past the compute dtype (a DoRA trial's fp32 bias), which `_grouped` handles.

        Why: at roberta-large size a grouped LoRA site cost about twice the frozen linear (x A^T, an accumulating
        GEMM into y, the low-rank input gradient summed into the frozen one), and the IA3 and DoRA rescalings ran
        over every row of the pack; folded, forward and input gradient are the frozen work, and only the
        rescaled trials' rows are rescaled (bench/profile/grouped_fold_parts.py, bench/packing_step.py)."""
        st = self._stacks
        x_dtype = x3.dtype
        if autocast:
            x3 = x3.to(compute_dtype(x3))
        dt = x3.dtype
        if any(torch.promote_types(dt, d) != dt for k, d in self._promotes.items() if k in present):
            return None
        Bt = st["Bt"].leaf if self._alpha is not None else st["Bt"].leaf * self._scalings
        own = st["bias"].leaf.to(dt) if "bias" in st else None
        bias = own if own is not None or self.own_bias else _cast(self.base_layer.bias, x3)
        scale, shift = self._rescaling(x_dtype, dt, own)
        scale_in = st["ia3_in"].leaf if "ia3_in" in st else None
        return grouped_fold.grouped_lora_linear(  # which casts the stacks to x3's dtype
            x3, self.base_layer.weight, bias, st["A"].leaf, Bt,
            1.0 if self._alpha is None else self._alpha, scale, shift, scale_in,
            before=self._bias_before if "bias" in st else None, out_slots=self._out_slots, in_slots=self._in_slots,
            lora_slots=self._lora_slots)

    def _rescaling(self, x_dtype: torch.dtype, dtype: torch.dtype, bias: torch.Tensor | None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The per-trial rescaling of the output, [K, out] in `dtype` (DoRA's magnitude over its row norms, times
        IA3's output vector), and the shift after it: a DoRA trial's own `bias`, which comes after its rescaling
        (times IA3's vector). None where no trial has one; the others' rows hold the identity."""
        st = self._stacks
        scale = shift = None
        if "magnitude" in st:
            scale = self._dora_scale(x_dtype).to(dtype)
            if bias is not None:
                shift = bias * self._after.to(bias.dtype)
        if "ia3_out" in st:
            ia3 = st["ia3_out"].leaf.to(dtype)
            scale = ia3 if scale is None else scale * ia3
            shift = None if shift is None else shift * ia3.to(shift.dtype)
        return scale, shift

    def _dora_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """[K, out] in the input's `dtype`: m / ||W + s B A||_row (detached) for the DoRA trials, as
        `reference.dora_linear` computes it (B A in autocast's dtype when on, scaled, then added to W in fp32),
        one for the others."""
        st = self._stacks
        with torch.no_grad():
            A = st["A"].leaf.index_select(0, self._dora)
            B = st["Bt"].leaf.index_select(0, self._dora).transpose(1, 2)
            ba = torch.bmm(B, A)
            delta = self._dora_alpha * ba if self._dora_alpha is not None else \
                (ba.float() * self._dora_scalings).to(ba.dtype)
            norm = (self.base_layer.weight.to(torch.float32) + delta).norm(p=2, dim=2)
        scale = (st["magnitude"].leaf.index_select(0, self._dora).to(torch.float32) / norm).to(dtype)
        ones = torch.ones(len(self.slots), scale.shape[-1], dtype=scale.dtype, device=scale.device)
        return ones.index_copy(0, self._dora, scale)

    # ----- the per-segment loop -----------------------------------------------------------------------------
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scales_input:
            return x
        parts = []  # IA3 on the input: per segment, before the shared GEMM
        for k, s, e in self.state.segments:
            peft = self._peft(k)
            parts.append(x[s:e] * peft.autopeft_ia3.to(x.dtype) if peft is not None and peft.ia3 == "in" else x[s:e])
        return torch.cat(parts)

    def _dropped(self, peft: PeftLinear, xk: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Trial k's LoRA input on its rows [s, e): its dropout keyed by those rows, as alone (`autopeft.dropout`)."""
        with dropout.narrowed(s, e):
            return dropout.apply(xk, peft.dropout, peft.dropout_site, self.training)

    def _loop(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight
        outs = []
        for k, s, e in self.state.segments:
            m, xk, y = self.slots[k], x[s:e], z[s:e]
            b = self._bias(m)
            peft = m if isinstance(m, PeftLinear) else None
            if peft is not None and peft.dora:  # reference.dora_linear, from its bias-free GEMM on
                A, B = peft.autopeft_lora_A, peft.autopeft_lora_B
                w_eff = w.to(torch.float32) + peft.scaling * (B.to(torch.float32) @ A.to(torch.float32))
                norm = w_eff.norm(p=2, dim=1).detach()
                scale = (peft.autopeft_dora_magnitude.to(torch.float32) / norm).to(xk.dtype)
                xa = F.linear(xk, _cast(A, xk))
                y = _add_low_rank(y, xa, _cast(B, xa), peft.scaling) * scale.to(y.dtype)
                y = y + _cast(b, xk) if b is not None else y
            else:
                if self.own_bias and b is not None:  # in the trial's own GEMM, the bias takes the GEMM's dtype
                    y = (y + _cast(b, xk)).to(y.dtype)
                if peft is not None and peft.rank:  # reference.lora_linear
                    xa = F.linear(self._dropped(peft, xk, s, e), _cast(peft.autopeft_lora_A, xk))
                    y = _add_low_rank(y, xa, _cast(peft.autopeft_lora_B, xa), peft.scaling)
            if peft is not None and peft.ia3 == "out":
                y = y * peft.autopeft_ia3.to(y.dtype)
            outs.append(y)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _accumulate(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """LoRA / bias segments added in place into the shared GEMM's output, one accumulating GEMM
        (`addmm_`, beta=1) per LoRA segment as `reference._add_low_rank` does; untouched rows cost nothing."""
        for k, s, e in self.state.segments:
            m = self.slots[k]
            peft = m if isinstance(m, PeftLinear) else None
            b = self._bias(m)
            seg = z[s:e]
            if self.own_bias and b is not None:
                seg.add_(b)
            if peft is not None and peft.rank:
                xk = x[s:e]
                xa = F.linear(self._dropped(peft, xk, s, e), _cast(peft.autopeft_lora_A, xk))
                seg.view(-1, seg.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]),
                                                   peft.autopeft_lora_B.to(xa.dtype).t(), alpha=peft.scaling)
        return z

    def extra_repr(self) -> str:
        path = "grouped" if self._stacks is not None else "per segment"
        return f"{self.in_features} -> {self.out_features}, {len(self.slots)} trials, {path}"


class SegmentedModule(nn.Module):
    """Runs trial k's own module on trial k's rows: BitFit'd LayerNorms and the classification heads, where
    there is no shared GEMM to save and the trial's module is the exact unpacked computation."""

    def __init__(self, slots: Sequence[nn.Module], state: PackState) -> None:
        super().__init__()
        self.slots = nn.ModuleList(slots)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for k, s, e in self.state.segments:
            with dropout.narrowed(s, e):  # a head's own dropout (RoBERTa's) keyed by its trial's rows
                outs.append(self.slots[k](x[s:e]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function for a pack: each segment with its own trial's prefix (or none).

    It calls `prefix.prefix_attention` itself per segment (through a view of the module that carries that
    trial's prefix), so the packed math is the unpacked math by construction.
    """
    prefixes: list[PrefixKV | None] | None = getattr(module, "autopeft_packed_prefix", None)
    state: PackState | None = getattr(module, "autopeft_pack_state", None)
    if prefixes is None or state is None:
        return prefix_attention(module, query, key, value, attention_mask, **kwargs)
    rows, outs = query.shape[0], []
    for k, s, e in state.segments:
        view = _PrefixView(module, prefixes[k])
        out, _ = prefix_attention(view, query[s:e], key[s:e], value[s:e], _slice(attention_mask, s, e, rows),
                                  **kwargs)
        outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), None


class _PrefixView:
    """The attention module as `prefix_attention` sees it, with one trial's prefix (attributes pass through)."""

    def __init__(self, module: nn.Module, prefix: PrefixKV | None) -> None:
        self._module = module
        self.autopeft_prefix = prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _use_packed_attention(model: nn.Module) -> None:
    from autopeft.peft.prefix import use_attention

    use_attention(model, PACKED_ATTENTION, packed_attention)


# ----- building a pack ------------------------------------------------------------------------------------------
def _own_params(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))


def _share_frozen(trial_model: nn.Module, shared: dict[str, nn.Parameter]) -> None:
    """Point every frozen parameter of a trial's model at the shared backbone's (PeftLinear's `base_layer.`
    is the only naming difference); the trial's own copies are dropped, so it costs only what it trains."""
    for mod_name, mod in trial_model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None or p.requires_grad:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            key = full.replace(".base_layer.", ".")
            if key not in shared:
                raise RuntimeError(f"packing: frozen parameter {full} has no counterpart in the shared backbone")
            if shared[key].shape != p.shape:
                raise RuntimeError(f"packing: {full} differs in shape from the shared backbone's {key}")
            mod._parameters[pname] = shared[key]


def build_packed_model(base: nn.Module, trial_models: Sequence[nn.Module], specs: Sequence[PeftSpec]) -> PackState:
    """Turn `base` (a frozen backbone, not injected) into the packed model of `trial_models` in place.

    Every site where some trial differs from the frozen backbone gets a segmented module; sites no trial
    touches stay as they are and run once over the pack. Returns the `PackState` the model reads its segments
    from (set `state.segments` before each forward).
    """
    arch = architecture_of(base)
    state = PackState()
    for p in base.parameters():
        p.requires_grad_(False)
    base_layers = get_layers(base)
    trial_layers = [get_layers(m) for m in trial_models]
    for i, layer in enumerate(base_layers):
        # 1. modules whose parameters some trial changes: adapted linears, BitFit biases (linears, LayerNorms)
        for path, mod in list(layer.named_modules()):
            if not path or not list(mod.parameters(recurse=False)):
                continue
            slots = [tl[i].get_submodule(path) for tl in trial_layers]
            if not any(isinstance(s, PeftLinear) or _own_params(s) for s in slots):
                continue
            parent, _, name = path.rpartition(".")
            holder = layer.get_submodule(parent) if parent else layer
            new = PackedLinear(mod, slots, state) if isinstance(mod, nn.Linear) else SegmentedModule(slots, state)
            setattr(holder, name, new)
        # 2. serial and parallel adapters: one post-hook per site, applying each trial's in its own order
        ops: dict[str, dict[int, list[tuple[str, nn.Module]]]] = {}
        capture = False
        for k, (spec, tl) in enumerate(zip(specs, trial_layers, strict=True)):
            tlayer = tl[i]
            if spec.serial_adapter[i]:
                sites = {"ffn": arch.ffn_out}
                if spec.serial_position == "houlsby":
                    sites = {"attn": arch.attn_out, **sites}
                for site, path in sites.items():
                    adapter = tlayer.get_submodule(f"autopeft_serial_{site}")
                    ops.setdefault(path, {}).setdefault(k, []).append(("serial", adapter))
            if spec.parallel_adapter[i]:
                adapter = tlayer.get_submodule("autopeft_parallel")
                ops.setdefault(arch.ffn_out, {}).setdefault(k, []).append(("parallel", adapter))
                capture = True
        if capture:
            layer.get_submodule(arch.ffn_in).register_forward_pre_hook(_capture_hook(state, i))
        for path, per_trial in ops.items():
            layer.get_submodule(path).register_forward_hook(
                _AdapterSite(state, per_trial, i if capture else None, len(trial_models)))
        # 3. prefixes: the attention module learns each trial's (None where a trial has none here)
        if any(spec.prefix[i] for spec in specs):
            attention = layer.get_submodule(arch.attention)
            attention.autopeft_packed_prefix = [tl[i].get_submodule(arch.attention).autopeft_prefix
                                                if spec.prefix[i] else None
                                                for spec, tl in zip(specs, trial_layers, strict=True)]
            attention.autopeft_pack_state = state
    # 4. heads: each trial its own
    for name in arch.head:
        if hasattr(base, name):
            setattr(base, name, SegmentedModule([getattr(m, name) for m in trial_models], state))
    if any(any(spec.prefix) for spec in specs):
        _use_packed_attention(base)
    base.autopeft_pack_state = state
    return state


def _capture_hook(state: PackState, layer: int):
    def hook(module: nn.Module, args: Any) -> None:
        state.captured[layer] = args[0]
    return hook


class _AdapterSite:
    """The forward hook at one sub-layer output where some trials have serial / parallel bottleneck adapters.

    `ops[k]` is trial k's, in the order `inject` registers them: ("serial", adapter) for an adapter on this
    output, ("parallel", adapter) for one reading the FFN's input (captured by a pre-hook into
    `PackState.captured[layer]`). Per segment (`_loop`) each trial's adapters run on its rows with
    `Bottleneck.apply`; grouped (`stack`), one pass per kind runs every trial's with batched GEMMs over
    stacked weights padded to the widest bottleneck. A trial without that kind of adapter here has zero
    weights and biases, and since every activation in `reference.ACTIVATIONS` maps 0 to 0 its rows come out
    unchanged, exactly (and padding columns contribute exactly zero, forward and backward).
    """

    KINDS = ("serial", "parallel")
    WEIGHTS = ("down", "down_bias", "up_t", "up_bias")

    def __init__(self, state: PackState, ops: dict[int, list[tuple[str, nn.Module]]], layer: int | None,
                 slots: int) -> None:
        self.state, self.ops, self.layer, self.slots = state, ops, layer, slots
        self._passes: list[dict[str, Any]] | None = None
        self._released: set[int] = set()
        state.sites.append(self)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        state = self.state
        out = output[0] if isinstance(output, tuple) else output
        x = state.captured.pop(self.layer, None) if self.layer is not None else None
        layout = None
        if self._passes is not None and not any(k in self._released for k, _, _ in state.segments):
            layout = state.layout(out.device, self.slots)
        if layout is not None:
            state.grouped += 1
            new = self._grouped(out, x, *layout)
        else:
            state.looped += 1
            new = self._loop(out, x)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _loop(self, out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        rows, pieces = out.shape[0], []
        for k, s, e in self.state.segments:
            y = out[s:e]
            xk = _slice(x, s, e, rows)
            for kind, adapter in self.ops.get(k, ()):
                y = adapter.apply(y) if kind == "serial" else adapter.apply(xk, residual=y, scale=adapter.scale)
            pieces.append(y)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def stack(self) -> bool:
        """One pass per kind, each over stacked weights; False (the loop stays) where a trial has two adapters
        of one kind here or the trials' adapters of one kind differ in activation."""
        if self._passes is not None:
            return False
        passes: list[tuple[str, dict[int, nn.Module]]] = []
        for kind in self.KINDS:
            mine = {k: [a for kd, a in ops if kd == kind] for k, ops in self.ops.items()}
            mine = {k: a for k, a in mine.items() if a}
            if not mine:
                continue
            if any(len(a) != 1 for a in mine.values()) or len({a[0].activation for a in mine.values()}) != 1:
                return False
            passes.append((kind, {k: a[0] for k, a in mine.items()}))
        for k, ops in self.ops.items():  # each trial's order must be the passes' order
            if [kind for kind, _ in ops] != [kind for kind, by_slot in passes if k in by_slot]:
                return False
        self._passes = [self._stack_pass(kind, by_slot) for kind, by_slot in passes]
        return True

    def _stack_pass(self, kind: str, by_slot: dict[int, nn.Module]) -> dict[str, Any]:
        adapters = [by_slot.get(k) for k in range(self.slots)]
        first = next(a for a in adapters if a is not None)
        dev = first.down_weight.device

        def stack(name: str, transpose: bool = False) -> _Stack:
            return _Stack([getattr(a, name) if a is not None else None for a in adapters], 0.0, dev, transpose)

        stacked: dict[str, Any] = {
            "kind": kind, "activation": ACTIVATIONS[first.activation], "down": stack("down_weight"),
            "down_bias": stack("down_bias"), "up_t": stack("up_weight", transpose=True), "up_bias": stack("up_bias"),
            "alpha": 1.0, "scales": None}
        if kind == "parallel":
            used = {a.scale for a in adapters if a is not None}
            if len(used) == 1:
                stacked["alpha"] = used.pop()
            else:  # a trial without one here has zero weights: its scale does not matter
                stacked["scales"] = torch.tensor([a.scale if a is not None else 0.0 for a in adapters],
                                                 device=dev).view(-1, 1)
        return stacked

    def stacks(self) -> list[_Stack]:
        return [p[name] for p in self._passes or () for name in self.WEIGHTS]

    def release(self, slot: int | None = None) -> None:
        if self._passes is None:
            return
        for p in self._passes:
            for name in self.WEIGHTS:
                p[name].release(slot)
        if slot is None:
            self._passes = None
            self._released.clear()
        else:
            self._released.add(slot)

    def _grouped(self, out: torch.Tensor, x: torch.Tensor | None, chunks: int, idx: torch.Tensor | None
                 ) -> torch.Tensor:
        """`reference.bottleneck_adapter` for every trial at once, one pass per kind, as batched GEMMs with the
        biases folded in (`baddbmm`, as `F.linear` folds them)."""
        autocast = torch.is_autocast_enabled(out.device.type)
        present = {k for k, _, _ in self.state.segments}
        y = out.reshape(chunks, -1, out.shape[-1])
        for p in self._passes:
            if torch.is_grad_enabled():
                for name in self.WEIGHTS:
                    p[name].used |= present
            inp = y if p["kind"] == "serial" else x.reshape(chunks, -1, x.shape[-1])
            if autocast:
                inp = inp.to(compute_dtype(inp))
            down, down_bias, up_t, up_bias = (p[n].leaf for n in self.WEIGHTS)
            h = p["activation"](_chunk_bmm(_chunk_rows(down_bias.to(inp.dtype), idx), inp, down, idx, transpose=True))
            up = _chunk_bmm(_chunk_rows(up_bias.to(h.dtype), idx), h, up_t, idx)
            if p["scales"] is not None:
                y = y + up * _chunk_rows(p["scales"].to(up.dtype), idx)
            else:
                y = y + up if p["alpha"] == 1.0 else torch.add(y, up, alpha=p["alpha"])
        return y.view(out.shape)


# ----- one trial inside a pack ---------------------------------------------------------------------------------
@dataclass
class _Trial:
    """The per-trial half of `train.train_and_evaluate`: everything that is not the shared forward/backward."""

    slot: int
    cfg: TrialConfig
    spec: PeftSpec
    model: nn.Module
    number: int | None
    fault: str | None
    train_ids: list[list[int]] = field(default_factory=list)
    labels: torch.Tensor | None = None
    select_split: Any = None
    batches: Iterator[list[int]] | None = None
    total_steps: int = 0
    optimizer: torch.optim.Optimizer | None = None
    schedule: Any = None
    trainable: list[nn.Parameter] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    step: int = 0
    train_s: float = 0.0
    widest: list[int] = field(default_factory=list)  # its batch of most (padded) tokens, for `_probe_memory`
    widest_area: int = 0
    failure: TrialFailed | None = None
    result: TrialResult | None = None


def _batch_stream(lengths: list[int], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """`train_and_evaluate`'s batch order: a fresh length-bucketed shuffle per epoch from one seeded rng."""
    while True:
        yield from length_bucketed_batches(lengths, batch_size, rng)


@dataclass
class PackStats:
    """The pack as a whole: what trial packing is measured by."""

    size: int
    train_seconds: float
    tokens: int
    peak_memory_mb: float
    steps: int  # packed steps (forward/backward passes over the pack)
    grouped: int = 0  # forward calls of packed sites that ran grouped (all trials in one set of batched ops)
    looped: int = 0  # ... and that ran the per-segment loop (a graph's replay runs no Python: not counted)
    cuda_graphs: int = 0  # 1: the packed steps ran as CUDA graphs (captured, no capture failed), else 0
    graph_captures: int = 0  # graphs captured (one per composition of trials and bucket length)
    graph_replays: int = 0  # packed steps that were one graph's replay
    graph_steps_eager: int = 0  # packed steps of the graphed path run uncaptured (a short batch in them)
    graph_failure: str | None = None  # why a capture failed (the pack then went on eagerly, under "auto")
    backbone_memory_mb: float = 0.0  # allocated once the shared backbone was on the device (CUDA; else 0)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


@dataclass
class Pack:
    results: list[TrialResult | TrialFailed]
    stats: PackStats


def packable(spec: PeftSpec) -> str | None:
    """None when the spec can join a pack, else why not. Every method packs today; kept as the one place a
    method that cannot share the backbone's GEMMs would be refused (it would run unpacked)."""
    return None


def _check_compatible(configs: Sequence[TrialConfig]) -> None:
    first = configs[0]
    for c in configs[1:]:
        if resolve_backbone(c.backbone) != resolve_backbone(first.backbone):
            raise UserError("packed trials must share one backbone; pack trials of different backbones separately")
        if c.task != first.task or c.data != first.data:
            raise UserError("packed trials must share one task and data; pack trials of different tasks separately")
        if c.fidelity.cuda_graphs != first.fidelity.cuda_graphs:  # one packed step, graphed or not
            raise UserError("packed trials must share fidelity.cuda_graphs")


def train_pack(configs: Sequence[TrialConfig], *, task: TaskData | None = None, select: str = "dev",
               heldout_fraction: float = 0.1, device: str | None = None, kernel_mode: str = "auto",
               trial_numbers: Sequence[int | None] | None = None, memory_probe: bool = True) -> Pack:
    """Train `configs` together on one shared frozen backbone; one result (or `TrialFailed`) per config, in order.

    Each config trains exactly as `train.run_trial(config)` would (same seeds, data order, optimiser, schedule,
    clipping, evaluation); see the module docstring for what is shared and what differs. `trial_numbers` are
    the study's trial numbers (for `AUTOPEFT_INJECT_FAULT` drills); `select` and `heldout_fraction` are as in
    `run_trial` and apply to every trial of the pack.
    """
    if not configs:
        return Pack([], PackStats(0, 0.0, 0, 0.0, 0))
    if select not in ("dev", "heldout"):
        raise ValueError(f"select must be 'dev' or 'heldout', not {select!r}")
    _check_compatible(configs)
    numbers = list(trial_numbers) if trial_numbers is not None else [None] * len(configs)
    if len(numbers) != len(configs):
        raise ValueError("trial_numbers must have one entry per config")
    task = task or configs[0].data.load(configs[0].task)
    kernels.set_kernels(kernel_mode)
    dev = pick_device(device)
    mode = configs[0].fidelity.cuda_graphs
    graphs = use_cuda_graphs(mode, dev)  # "on" off CUDA: a UserError before anything trains
    static = graphs or STATIC_WITHOUT_GRAPHS
    bf16 = dev.type == "cuda" and CUDA_BF16
    dtype = torch.bfloat16 if bf16 else torch.float32

    base, tokenizer = seeded_backbone(configs[0].backbone, task, dtype, configs[0].fidelity.seed)
    shared = dict(base.named_parameters())
    trials: list[_Trial] = []
    for slot, (cfg, number) in enumerate(zip(configs, numbers, strict=True)):
        # as run_trial: the head's init, then the adapters', from the seed
        model, _ = seeded_backbone(cfg.backbone, task, dtype, cfg.fidelity.seed)
        spec = cfg.spec if isinstance(cfg.spec, PeftSpec) else PeftSpec.from_dict(
            cfg.spec, num_layers=model.config.num_hidden_layers)
        why = packable(spec)
        if why:
            raise UserError(f"spec {spec.summary()} cannot be packed: {why}")
        _seed_everything(cfg.fidelity.seed)
        info = inject(model, spec)
        model.autopeft_backbone_params = info.backbone_params
        _share_frozen(model, shared)
        token = CURRENT_TRIAL.set(number)
        try:
            fault = injected_fault()
        finally:
            CURRENT_TRIAL.reset(token)
        trials.append(_Trial(slot, cfg, spec, model, number, fault))
    state = build_packed_model(base, [t.model for t in trials], [t.spec for t in trials])
    base.to(dev)
    run = _Run(backbone_mb=torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0)
    cache_tag = (resolve_backbone(configs[0].backbone), task.name, task.source)
    for t in trials:
        _prepare(t, task, tokenizer, select, heldout_fraction, dev, cache_tag)
    if GROUPED:  # after `_prepare`: the parameters are on the device, in fp32, and in their optimisers
        state.stack()
    pad_id = tokenizer.pad_token_id

    # no cast cache under graphs: a cached bf16 copy of a trainable weight (a head) would be baked into the graph
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not static) if bf16 else _null()
    base.train()
    active = [t for t in trials if t.total_steps > 0]
    mem: PeakMemory | None = None
    try:
        with PeakMemory(dev) as mem:
            t0 = time.perf_counter()
            if static:
                _static_steps(base, state, trials, active, dev, autocast, pad_id, mode, graphs, t0, run)
            else:
                _eager_steps(base, state, active, dev, autocast, pad_id, t0, run)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            pack_s = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError as exc:  # a real OOM belongs to the whole pack
        memory = _memory_at_failure(dev, mem)
        detail = f"pack of {len(trials)} trials: {str(exc).splitlines()[0] if str(exc) else 'out of memory'}"
        for t in trials:
            if t.failure is None:
                t.failure = TrialFailed("oom", detail, memory_mb=memory)
        return Pack([t.failure for t in trials], run.stats(len(trials), 0.0, memory or 0.0, state, dev))
    finally:
        state.segments = []
        state.captured.clear()
        state.release()
        for t in trials:  # static gradients (graphed path) of parameters outside the stacks
            for p in t.trainable:
                p.grad = None

    stats = run.stats(len(trials), pack_s, mem.peak_mb, state, dev)
    for t in trials:
        if t.failure is None:
            try:
                t.result = _finish(t, task, tokenizer, select, heldout_fraction, dev, cache_tag, pad_id, stats,
                                   memory_probe, trials)
            except TrialFailed as exc:
                t.failure = exc
            except torch.cuda.OutOfMemoryError as exc:  # evaluation or the memory probe
                t.failure = TrialFailed("oom", str(exc).splitlines()[0] if str(exc) else "out of memory",
                                        memory_mb=_memory_at_failure(dev, None))
    return Pack([t.failure if t.failure is not None else t.result for t in trials], stats)


@dataclass
class _Run:
    """What the training loop of a pack counts, for `PackStats`."""

    tokens: int = 0
    steps: int = 0
    graphed: bool = False  # the static (graphed) path ran
    captures: int = 0
    replays: int = 0
    steps_eager: int = 0
    failure: str | None = None
    backbone_mb: float = 0.0

    def stats(self, size: int, seconds: float, peak_mb: float, state: PackState, dev: torch.device) -> PackStats:
        used = self.graphed and dev.type == "cuda" and self.failure is None and self.captures > 0
        return PackStats(size, seconds, self.tokens, peak_mb, self.steps, state.grouped, state.looped, int(used),
                         self.captures, self.replays, self.steps_eager, self.failure, self.backbone_mb)


def _eager_steps(base: nn.Module, state: PackState, active: list[_Trial], dev: torch.device, autocast: Any,
                 pad_id: int, t0: float, run: _Run) -> None:
    """The eager packed step (the reference, and the path without CUDA graphs): every trial's loss read on the
    host between forward and backward, only the finite ones back-propagated, gradients handed out by the
    stacks' hooks (`_Stack._hand_out`), a trial leaving the pack the step its loss turns non-finite."""
    causal = is_causal(base)  # no mask for a causal decoder, as train.collate gives it none
    while active:
        batches = [(t, next(t.batches)) for t in active]
        input_ids, mask, segments = _collate_pack(batches, pad_id)
        input_ids, mask = input_ids.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
        state.segments = segments
        with autocast, dropout.rows(_pack_keys(batches).to(dev)):
            logits = base(input_ids=input_ids, attention_mask=None if causal else mask).logits
            losses = [_loss(base, logits[s:e], t.labels[idx].to(dev))
                      for (t, idx), (_, s, e) in zip(batches, segments, strict=True)]
            losses = [loss * float("nan") if t.fault == "nan" else loss
                      for (t, _), loss in zip(batches, losses, strict=True)]
        state.captured.clear()
        values = torch.stack([loss.detach().float() for loss in losses]).tolist()  # one sync for the pack
        keep: list[tuple[_Trial, list[int], torch.Tensor, float]] = []
        for (t, idx), loss, value in zip(batches, losses, values, strict=True):
            if t.fault == "oom":  # a simulated allocator failure, for this trial only
                t.failure = TrialFailed("oom", f"CUDA out of memory (simulated by {FAULT_ENV})")
            elif not math.isfinite(value):  # this trial leaves the pack; its loss is not back-propagated
                t.failure = TrialFailed("nan", f"loss became {value} at step {t.step}")
            else:
                keep.append((t, idx, loss, value))
        if keep:  # one backward for the pack: parameters are disjoint, so each gets only its own gradient
            torch.stack([loss for _, _, loss, _ in keep]).sum().backward()
        for t, idx, _, value in keep:
            run.tokens += _optimizer_step(t, idx)
            t.optimizer.zero_grad(set_to_none=True)
            t.losses.append(value)
        now = time.perf_counter()
        for t in active:
            if t.failure is not None:  # its parameters may hold NaN now: free its gradients, forget it
                for p in t.trainable:
                    p.grad = None
            elif t.step >= t.total_steps:
                t.train_s = now - t0
        run.steps += 1
        for t in active:
            if t.failure is not None or t.step >= t.total_steps:
                state.release(t.slot)  # it leaves the pack: its parameters become its own again
        active[:] = [t for t in active if t.failure is None and t.step < t.total_steps]


def _optimizer_step(t: _Trial, idx: list[int]) -> int:
    """A trial's own clipping, optimiser and schedule step after a packed backward, and its step done: its step
    count, tokens and widest batch (for `_probe_memory`); returns its tokens."""
    if t.cfg.fidelity.grad_clip:
        torch.nn.utils.clip_grad_norm_(t.trainable, t.cfg.fidelity.grad_clip)
    t.optimizer.step()
    t.schedule.step()
    lengths = [len(t.train_ids[i]) for i in idx]
    t.tokens += sum(lengths)
    if len(idx) * max(lengths) > t.widest_area:
        t.widest, t.widest_area = idx, len(idx) * max(lengths)
    t.step += 1
    return sum(lengths)


#: run the graphed path's host logic (static gradients, bucketed widths, layouts built before the step, losses
#: read one step late, a new composition per change of the active set) without capturing, where graphs are not
#: used (CPU): what the CPU tests check that logic by, against the eager path. Off in normal use.
STATIC_WITHOUT_GRAPHS = False
#: a pack on CUDA runs a bf16 backbone under bf16 autocast, as `run_trial` does; False runs it in fp32 without
#: autocast (the CUDA tests compare graphed and eager packs in fp32, where they agree to rounding)
CUDA_BF16 = True


def _static_step_fn(base: nn.Module, state: PackState, trials: Sequence[_Trial], autocast: Any):
    """The packed forward + losses + backward as a function of static inputs, for `GraphedStep`: no value is read
    on the host. The backward's root is the sum of every trial's loss, NaN or not: parameters are disjoint and
    every op of the shared frozen path is row-wise (GEMMs over rows, attention per example, LayerNorm per
    token; no frozen weight's gradient is computed), so d(sum)/d(a row's activation) comes from that row's
    trial's loss alone and a NaN loss puts NaN only into its own trial's rows and parameters (each stack's
    slot is its own region; tests check this). The per-trial losses, as one [n] tensor, are the output: the
    loop reads them after the step, one step late, and removes a trial whose loss was not finite."""

    causal = is_causal(base)  # no mask for a causal decoder, as train.collate gives it none

    def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = inputs["labels"]
        with autocast, dropout.rows(inputs.get(dropout.KEYS)):
            logits = base(input_ids=inputs["input_ids"],
                          attention_mask=None if causal else inputs["attention_mask"]).logits
            losses = []
            for k, s, e in state.segments:
                loss = _loss(base, logits[s:e], labels[s:e])
                losses.append(loss * float("nan") if trials[k].fault == "nan" else loss)
        state.captured.clear()
        stacked = torch.stack([loss.float() for loss in losses])
        stacked.sum().backward()
        return stacked.detach()

    return step


class _UncapturedStep(StaticGradients):
    """`GraphedStep`'s interface and static gradients without graphs (`STATIC_WITHOUT_GRAPHS`, CPU): each call
    runs the step eagerly; `captures` and `replays` count what a `GraphedStep` would have done."""

    failure: str | None = None
    active = True

    def __init__(self, fn: Any, params: Sequence[torch.Tensor]) -> None:
        super().__init__(fn, params)
        self._seen: set[tuple] = set()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check_grads()  # as GraphedStep: a replay would accumulate into the .grad tensors held at capture
        key = _key(inputs)
        if key in self._seen:
            self.replays += 1
        else:
            self._seen.add(key)
            self.captures += 1
        return self._fn(dict(inputs)).detach()

    def release(self) -> None:
        self._seen.clear()
        super().release()


def _static_steps(base: nn.Module, state: PackState, trials: Sequence[_Trial], active: list[_Trial],
                  dev: torch.device, autocast: Any, pad_id: int, mode: str, graphs: bool, t0: float,
                  run: _Run) -> None:
    """The packed step as CUDA graphs (`GraphedStep`), where the eager step breaks a capture's rules, fixed:

    * Fixed shapes: the pack is right-padded to the bucket length (`bucket_length`) of its longest example,
      so a composition needs a handful of graphs (4 at max_length 128); padding is masked out, so no loss
      changes. A composition is the trials in the step and their rows, i.e. the segments.
    * The composition and its layout are host data: the segments are set and `PackState.layout` built before
      the step, outside the captured region, and kept (the graphs read the index tensor by address).
    * One graph runner (`GraphedStep`) per composition of full batches. A trial leaving the pack (finished,
      NaN, simulated OOM) changes the composition: the runner is dropped (graphs and memory pool) and the next
      full step captures anew, the warm-up of each capture being the real step. The alternative, keeping a
      departed trial's slot in the graphs with zero loss weight until the pack ends, would keep the graphs but
      pay its rows' share of every remaining step's GEMMs (1/K of them) for the rest of the pack, run its
      data on, and carry a possibly-NaN slot through every step; a trial leaves at most once, and a search
      pack's trials share a step count so they usually all finish together, so new captures cost less (a few
      captures of about one host-side step each, once). A step where some trial has a short batch (the last of
      an epoch) runs the same function uncaptured: one-off compositions are not worth a capture.
    * Static gradients: the stacks' gradients accumulate into static buffers whose regions are the trials'
      parameters' `.grad` (`PackState.make_static`), set once; other trainable parameters (heads, BitFit
      LayerNorms, prefixes, looped sites) get zero `.grad`s; all are zeroed in place after the optimiser steps.
    * No host read inside the step: the backward's root is the sum of all the trials' losses (see
      `_static_step_fn`), and the losses are read after it, one step late (`train.LaggedLoss`). A trial whose
      loss was not finite so takes one more optimiser step on its NaN gradients (its own parameters only) and
      runs one more step before it fails `nan` with the step it happened at; the other trials are unaffected,
      as in the unpacked graphed trainer.

    The optimiser steps, clipping and schedules stay outside the graph (Python-side state, as `GraphedStep`
    explains). A capture failure: under "on" every trial still in the pack fails `cuda_graphs`; under "auto"
    one warning, and the pack goes on with the same step uncaptured (the same computation)."""
    run.graphed = True
    slots = len(trials)
    max_length = max(t.cfg.fidelity.max_length for t in trials)
    fn = _static_step_fn(base, state, trials, autocast)
    leaves = state.make_static()
    stacked = state.stacked_params()
    lag = LaggedLoss(dev, slots)
    runner: GraphedStep | _UncapturedStep | None = None
    runner_key: tuple | None = None
    capture = graphs or STATIC_WITHOUT_GRAPHS

    def static_grads(group: Sequence[_Trial]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = leaves + [p for t in group for p in t.trainable if id(p) not in stacked]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return params, [p.grad for p in params]

    def drop_runner() -> None:
        nonlocal runner, runner_key
        if runner is not None:
            run.captures += runner.captures
            run.replays += runner.replays
            runner.release()
        runner, runner_key = None, None

    def settle(done: tuple[list[tuple[_Trial, int]], list[float]] | None) -> None:
        """Record the losses of the step before (one step late: `train.LaggedLoss`)."""
        for (t, at), value in zip(*done, strict=True) if done is not None else ():
            if t.failure is not None:
                continue
            if not math.isfinite(value):
                t.failure = TrialFailed("nan", f"loss became {value} at step {at}")
            else:
                t.losses.append(value)

    params, grads = static_grads(active)
    pin = dev.type == "cuda"
    try:
        while active:
            batches = [(t, next(t.batches)) for t in active]
            longest = max(len(t.train_ids[i]) for t, idx in batches for i in idx)
            input_ids, mask, segments = _collate_pack(batches, pad_id, bucket_length(longest, max_length))
            labels = torch.cat([t.labels[idx] for t, idx in batches])
            inputs = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                      dropout.KEYS: _pack_keys(batches)}
            inputs = {k: (v.pin_memory() if pin else v).to(dev, non_blocking=True) for k, v in inputs.items()}
            state.segments = segments
            state.layout(dev, slots)  # built here, before (and outside) any capture
            full = all(len(idx) == t.cfg.fidelity.batch_size for t, idx in batches)
            if capture and full:
                key = tuple(segments)
                if runner_key != key:
                    drop_runner()
                    runner = GraphedStep(fn, params) if graphs else _UncapturedStep(fn, params)
                    runner_key = key
                losses = runner(inputs)  # a new bucket: warm-up step (the real one) + capture; else a replay
                if runner.failure is not None:
                    run.failure = runner.failure
                    capture = False
                    drop_runner()
                    state.captured.clear()  # a capture stopped half-way may have left a block input behind
                    try:
                        _graphs_failed(base, run.failure, mode, f"a pack of {len(trials)} trials")
                    except TrialFailed as exc:  # "on": the pack cannot run as asked
                        for t in active:
                            t.failure = exc
                        # the previous step's losses are still queued: a trial that finished on it (and left
                        # the pack before this capture) keeps its last loss, or fails `nan` on it
                        settle(lag.pop())
                        return
            else:
                losses = fn(inputs)
                run.steps_eager += 1
            settle(lag.push([(t, t.step) for t, _ in batches], losses))
            for t, idx in batches:
                if t.fault == "oom" and t.failure is None:  # a simulated allocator failure, for this trial only
                    t.failure = TrialFailed("oom", f"CUDA out of memory (simulated by {FAULT_ENV})")
                if t.failure is None:
                    run.tokens += _optimizer_step(t, idx)
            torch._foreach_zero_(grads)  # in place: the graphs accumulate into these very tensors
            now = time.perf_counter()
            run.steps += 1
            leaving = [t for t in active if t.failure is not None or t.step >= t.total_steps]
            for t in leaving:
                if t.failure is None:
                    t.train_s = now - t0
                state.release(t.slot)  # its parameters become its own again, without a .grad
                for p in t.trainable:
                    p.grad = None
            if leaving:
                drop_runner()  # its graphs write into gradients that are gone now
                active[:] = [t for t in active if t not in leaving]
                params, grads = static_grads(active)
        settle(lag.pop())
    finally:
        drop_runner()


def _collate_pack(batches: Sequence[tuple[_Trial, list[int]]], pad_id: int, width: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """The packed micro-batch: each trial's micro-batch in turn, all right-padded to the widest example (or to
    `width`, a CUDA graph's bucket length: masked positions, no loss changes), built on the host and copied
    once; and the segments (slot, first row, end row) that say whose rows are whose."""
    rows = [t.train_ids[i] for t, idx in batches for i in idx]
    width = max(width or 0, max(len(r) for r in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
    segments, start = [], 0
    for t, idx in batches:
        segments.append((t.slot, start, start + len(idx)))
        start += len(idx)
    return input_ids, mask, segments


def _pack_keys(batches: Sequence[tuple[_Trial, list[int]]]) -> torch.Tensor:
    """The pack's dropout keys (`autopeft.dropout`): each trial's rows keyed by its seed and step, as its
    rows would be alone."""
    return torch.cat([dropout.row_keys(t.cfg.fidelity.seed, t.step, len(idx)) for t, idx in batches])


def pack_trials(configs: Sequence[TrialConfig], task: TaskData | None = None, **kwargs: Any
                ) -> list[TrialResult | TrialFailed]:
    """`train_pack`'s per-trial outcomes only: a `TrialResult` or the `TrialFailed` of each config, in order."""
    return train_pack(configs, task=task, **kwargs).results


def _loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss HF's *ForSequenceClassification computes inside forward, on one trial's rows."""
    config = model.config
    if config.problem_type == "regression":
        loss_fct = nn.MSELoss()
        return loss_fct(logits.squeeze(), labels.squeeze()) if config.num_labels == 1 else loss_fct(logits, labels)
    return nn.CrossEntropyLoss()(logits.view(-1, config.num_labels), labels.view(-1))


def _prepare(t: _Trial, task: TaskData, tokenizer: Any, select: str, heldout_fraction: float, dev: torch.device,
             cache_tag: tuple) -> None:
    """`train_and_evaluate`'s set-up for one trial: its data, order, optimiser and schedule, in the same order."""
    fid = t.cfg.fidelity
    for p in t.model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    t.model.to(dev)
    train_split, t.select_split = trial_splits(task, fid, select, heldout_fraction, cache_tag)
    t.train_ids = tokenize(tokenizer, train_split, fid.max_length,
                           (*cache_tag, "train", select, fid.seed, heldout_fraction, fid.train_examples))
    t.batches = _batch_stream([len(x) for x in t.train_ids], fid.batch_size, random.Random(fid.seed))
    steps_per_epoch = math.ceil(len(t.train_ids) / fid.batch_size)
    total = t.total_steps = fid.max_steps or max(1, math.ceil(steps_per_epoch * fid.epochs))
    warmup = int(total * fid.warmup_ratio)
    t.optimizer = torch.optim.AdamW(_param_groups(t.model, fid), weight_decay=fid.weight_decay)
    t.schedule = torch.optim.lr_scheduler.LambdaLR(
        t.optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup
        else max(0.0, (total - s) / max(1, total - warmup)))
    t.labels = torch.tensor(train_split.label, dtype=torch.float32 if task.is_regression else torch.long)
    t.trainable = [p for p in t.model.parameters() if p.requires_grad]


def _probe_memory(t: _Trial, dev: torch.device, pad_id: int) -> float:
    """Peak memory (MiB) of one standalone training step of this trial, on its widest batch.

    A packed trial's own footprint is not observable inside the pack, so it is measured here: one forward and
    backward of the trial's own model (sharing the backbone) with its optimiser state allocated, no update.
    On CUDA the other trials' tensors (their parameters and optimiser state, resident meanwhile) are taken off
    by their exact sizes, so the figure is what this trial would hold alone.
    """
    if not t.widest:
        return 0.0
    batch = collate(t.train_ids, t.widest, pad_id, dev)
    t.model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else _null()
    with PeakMemory(dev) as mem:
        keys = dropout.row_keys(t.cfg.fidelity.seed, 0, len(t.widest)).to(dev)  # keyed, as the trial trains
        with autocast, dropout.rows(keys):
            loss = t.model(**batch, labels=t.labels[t.widest].to(dev)).loss
        loss.backward()
    t.optimizer.zero_grad(set_to_none=True)
    return mem.peak_mb


def _tensor_bytes(t: _Trial) -> int:
    n = sum(p.numel() * p.element_size() for p in t.trainable)
    for s in t.optimizer.state.values():
        n += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
    return n


def _finish(t: _Trial, task: TaskData, tokenizer: Any, select: str, heldout_fraction: float, dev: torch.device,
            cache_tag: tuple, pad_id: int, stats: PackStats, memory_probe: bool, pack: Sequence[_Trial]
            ) -> TrialResult:
    """`train_and_evaluate`'s evaluation and measurements, on the trial's own (weight-sharing) model."""
    fid = t.cfg.fidelity
    peak = stats.peak_memory_mb
    if memory_probe:
        peak = _probe_memory(t, dev, pad_id)
        if dev.type == "cuda":
            peak -= sum(_tensor_bytes(o) for o in pack if o is not t and o.optimizer is not None) / 2**20
    t1 = time.perf_counter()
    sel_ids = tokenize(tokenizer, t.select_split, fid.max_length, (*cache_tag, select, fid.seed, heldout_fraction))
    scores = evaluate(t.model, sel_ids, t.select_split.label, task, fid.eval_batch_size, pad_id, dev)
    dev_metric = None
    if select == "heldout":
        dev_ids = tokenize(tokenizer, task.dev, fid.max_length, (*cache_tag, "dev"))
        dev_metric = evaluate(t.model, dev_ids, task.dev.label, task, fid.eval_batch_size, pad_id, dev)[
            task.metric_name]
    eval_s = time.perf_counter() - t1
    main = scores[task.metric_name]
    if not math.isfinite(main):
        raise TrialFailed("nan", f"{task.metric_name} is {main}")
    losses = t.losses
    # on CUDA, whether the pack's steps ran as CUDA graphs (1) or eagerly (0: off, or a capture failed)
    graph_flag = {"cuda_graphs": float(stats.cuda_graphs)} if dev.type == "cuda" else {}
    metrics = Metrics(
        metric_name=task.metric_name, metric=main, trainable_params=sum(p.numel() for p in t.trainable),
        backbone_params=t.model.autopeft_backbone_params, peak_memory_mb=max(0.0, peak), train_seconds=t.train_s,
        eval_seconds=eval_s, tokens_per_s=t.tokens / t.train_s if t.train_s > 0 else 0.0,
        train_loss=float(np.mean(losses[-max(1, len(losses) // 10):])), steps=t.step,
        extra={k: v for k, v in scores.items() if k != task.metric_name} | graph_flag, dev_metric=dev_metric)
    return TrialResult(metrics, t.model, t.spec, losses)

