"""One trial at one fidelity: data, loop, evaluation, measurements.

Every number in the returned `Metrics` is measured here: accuracy on real examples, trainable parameters
counted on the model, peak memory from the CUDA allocator (GPU) or a sampler of the process's resident
set (CPU). Anything that goes wrong inside the trial (NaN loss, out of memory) raises `TrialFailed` with a
reason, so the search records it and goes on.
"""

from __future__ import annotations

import contextvars
import copy
import ctypes
import functools
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from autopeft import dropout, kernels
from autopeft.cuda_graphs import GraphedStep, bucket_length, use_cuda_graphs
from autopeft.errors import TrialFailed
from autopeft.models import is_causal, load_backbone, resolve_backbone
from autopeft.peft import inject
from autopeft.spec import Fidelity, Metrics, PeftSpec
from autopeft.tasks import Split, TaskData, compute_metrics, holdout_split, load_task, resolve_data_dir

_log = logging.getLogger("autopeft.train")

#: learning rates that work for each method with AdamW at these model sizes; a fidelity's `lr` overrides all
DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "serial": 1e-3, "parallel": 1e-3, "prefix": 1e-2, "ia3": 3e-3,
              "bitfit": 1e-3, "head": 1e-3}


@dataclass(frozen=True)
class DataOptions:
    """Where a task's data comes from (GLUE dir, hub, or a user's files)."""

    data_dir: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    regression: bool = False

    def load(self, task: str) -> TaskData:
        return load_task(task, resolve_data_dir(self.data_dir), train_file=self.train_file, dev_file=self.dev_file,
                         text_column=self.text_column, text_pair_column=self.text_pair_column,
                         label_column=self.label_column, regression=self.regression)


@dataclass(frozen=True)
class TrialConfig:
    """Everything that defines one trial; `autopeft train --config` reads this from YAML."""

    task: str
    spec: PeftSpec | dict
    backbone: str = "minilm"
    fidelity: Fidelity = field(default_factory=Fidelity)
    data: DataOptions = field(default_factory=DataOptions)


@dataclass
class TrialResult:
    metrics: Metrics
    model: nn.Module
    spec: PeftSpec
    loss_curve: list[float]


#: Fault injection for tests and drills: `AUTOPEFT_INJECT_FAULT="oom@3,nan@5"` makes trial 3 hit a (simulated)
#: allocator failure and trial 5 a NaN loss inside the training step; a bare `oom`/`nan` hits every trial. The
#: trial number comes from `CURRENT_TRIAL`, which the search sets around each trial.
FAULT_ENV = "AUTOPEFT_INJECT_FAULT"
CURRENT_TRIAL: contextvars.ContextVar[int | None] = contextvars.ContextVar("autopeft_trial", default=None)


def injected_fault() -> str | None:
    """The fault `AUTOPEFT_INJECT_FAULT` asks of the current trial: 'oom', 'nan' or None."""
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    number = CURRENT_TRIAL.get()
    for item in spec.split(","):
        kind, _, target = item.strip().partition("@")
        if kind in ("oom", "nan") and (not target or (number is not None and target.strip() == str(number))):
            return kind
    return None


# ----- data -------------------------------------------------------------------------------------------------
_TOKEN_CACHE: dict[tuple, list[list[int]]] = {}


def tokenize(tokenizer: Any, split: Split, max_length: int, key: tuple) -> list[list[int]]:
    """Token ids per example, computed once per (tokenizer, data, max_length) in this process.

    A search trains many configurations on the same data: tokenising once saves a few seconds per trial.
    """
    cache_key = (*key, max_length, len(split))
    if cache_key not in _TOKEN_CACHE:
        enc = tokenizer(split.text, split.text_pair, truncation=True, max_length=max_length)
        _TOKEN_CACHE[cache_key] = enc["input_ids"]
    return _TOKEN_CACHE[cache_key]


_SPLIT_CACHE: dict[tuple, tuple[Split, Split]] = {}


def trial_splits(task: TaskData, fid: Fidelity, select: str, heldout_fraction: float, cache_tag: tuple
                 ) -> tuple[Split, Split]:
    """(training examples, selection split) of a trial: the seeded held-out carve and the seeded subsample.

    Pure in its arguments and the same for every trial of a study, so computed once per process (like the
    tokenisation): on SST-2's 67k examples the stratified carve alone is 0.1-0.2 s.
    """
    key = (*cache_tag, select, fid.seed, heldout_fraction, fid.train_examples, len(task.train))
    if key not in _SPLIT_CACHE:
        train_split, select_split = task.train, task.dev
        if select == "heldout":
            train_split, select_split = holdout_split(task.train, heldout_fraction, fid.seed)
        if fid.train_examples is not None and fid.train_examples < len(train_split):
            idx = random.Random(fid.seed).sample(range(len(train_split)), fid.train_examples)
            train_split = train_split.subset(sorted(idx))
        if len(_SPLIT_CACHE) >= 8:
            _SPLIT_CACHE.clear()
        _SPLIT_CACHE[key] = (train_split, select_split)
    return _SPLIT_CACHE[key]


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                            bucket_batches: int = 50) -> list[list[int]]:
    """Shuffle, then sort by length inside windows of `bucket_batches` batches: little padding, still random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(ids: list[list[int]], idx: Sequence[int], pad_id: int, device: torch.device,
            width: int | None = None, causal: bool = False) -> dict[str, torch.Tensor]:
    """The batch `idx` padded on the right to its longest example, or to `width` (a CUDA graph's bucket length):
    padded positions have attention mask 0, so a classifier's per-example loss is the same either way.

    A causal decoder (`causal`) gets no mask: its real tokens never attend to the padding after them, and its
    classifier reads the last real token (found from the pad id), so every score is the same without one. With
    a mask, transformers cannot tell inside a CUDA graph's capture that a batch is unpadded, builds the full
    4D mask, and SDPA then computes every block of attention instead of the causal half: at Llama-1.1B size,
    attention took 20.4 ms of a graphed step against 9.2 ms eagerly (bench/results/
    kernels_llama_mask_profile-h200-2026-11-30.json)."""
    width = max(width or 0, max(len(ids[i]) for i in idx))
    input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    for row, i in enumerate(idx):
        input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
    batch = {"input_ids": input_ids.to(device)}
    if not causal:
        lengths = torch.tensor([len(ids[i]) for i in idx])
        batch["attention_mask"] = (torch.arange(width) < lengths[:, None]).long().to(device)
    return batch


# ----- measurement ------------------------------------------------------------------------------------------
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _heap_in_use_reader() -> Callable[[], int] | None:
    """Bytes the process's malloc has handed out and not taken back (glibc `mallinfo2`), or None elsewhere.

    CPU tensors live on the malloc heap. Unlike the resident set, which glibc rarely gives back to the OS, this
    falls when a trial frees its activations, so a later trial's peak is its own and not the high-water mark
    left by an earlier one (with RSS every trial after the first measured the same ~60 MiB).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def read() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)  # small-block bytes in use + mmap-ed large blocks

    return read


class PeakMemory:
    """Peak memory of the trial in MiB: the CUDA allocator's peak (the whole footprint on the device), or on CPU
    the peak growth of the malloc heap in use over its level at start (sampled every 5 ms in a thread), or of
    the resident set where the C library cannot tell heap use."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            read = _heap_in_use_reader()
            if read is None:
                import psutil

                proc = psutil.Process()

                def read() -> int:
                    return proc.memory_info().rss

            self._read = read
            self._base = self._peak = read()

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, read())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_mb = peak / 2**20  # whole footprint on the device: weights + activations + optimizer
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._peak = max(self._peak, self._read())
            self.peak_mb = max(0, self._peak - self._base) / 2**20


def _memory_at_failure(device: torch.device, mem: PeakMemory | None) -> float | None:
    """Peak memory (MiB) of a trial that ran out of it: the allocator's peak on CUDA, PeakMemory's sample on CPU."""
    try:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20
        return mem.peak_mb if mem is not None else None
    except Exception:
        return None


class LaggedLoss:
    """Each step's loss, handed back one step late: reading a CUDA loss right away would make the host wait for
    the whole step it just launched, every step, and a launch-bound step (all the more a graphed one) would
    lose the overlap of the next step's host work with this step's GPU work.

    On CUDA the loss is copied into pinned host memory without blocking, behind an event; `push` of step n
    returns step n-1's value, waiting only for that step's loss. On CPU values are ready at once (same order).
    A NaN is so caught one step after it happens, with its own step number. The loss may be a vector of up to
    `size` values (a pack's per-trial losses); it comes back as `tolist()` gives it (a float for a scalar).
    """

    def __init__(self, device: torch.device, size: int = 1) -> None:
        self._cuda = device.type == "cuda"
        self._host = torch.empty(2, max(1, size), dtype=torch.float32, pin_memory=self._cuda)
        self._slot = 0
        self._pending: tuple[Any, torch.Tensor, torch.cuda.Event | None] | None = None

    def push(self, tag: Any, loss: torch.Tensor) -> tuple[Any, Any] | None:
        """Queue the loss of `tag` (a step); return (tag, value) of the one queued before, if any."""
        done = self.pop()
        loss = loss.detach()
        if not self._cuda:
            self._pending = (tag, loss, None)
            return done
        # two slots: one being read while the other is written
        buf = self._host[self._slot, :loss.numel()].view(loss.shape)
        self._slot ^= 1
        buf.copy_(loss.float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (tag, buf, event)
        return done

    def pop(self) -> tuple[Any, Any] | None:
        """(tag, value) of the queued loss, waiting for it if need be; None when nothing is queued."""
        if self._pending is None:
            return None
        tag, value, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return tag, value.float().tolist()


_GRAPH_WARNINGS: set[str] = set()


def _graphs_failed(model: nn.Module, failure: str, mode: str, label: str) -> None:
    """A capture failed (`GraphedStep.failure`): fatal under "on", else one warning per reason and process,
    and the trial goes on eagerly (its `Metrics.extra["cuda_graphs"]` says 0)."""
    from autopeft.peft.linear import PeftLinear

    for m in model.modules():  # a capture stopped half-way through a layer may leave shared outputs kept
        if isinstance(m, PeftLinear) and m.lora_group is not None:
            m.lora_group.clear()
    if mode == "on":
        raise TrialFailed("cuda_graphs", f"CUDA graph capture failed ({failure}); use --cuda-graphs auto or off")
    if failure not in _GRAPH_WARNINGS:
        _GRAPH_WARNINGS.add(failure)
        _log.warning("CUDA graph capture failed for %s, training eagerly instead: %s", label or "a trial", failure)


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _param_groups(model: nn.Module, fidelity: Fidelity) -> list[dict[str, Any]]:
    """One AdamW group per method so a mixed spec trains each part at its own learning rate."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_" in name or "autopeft_dora" in name:  # also HF PEFT's lora_A / lora_B (benchmarks)
            kind = "dora" if "autopeft_dora" in name else "lora"
        elif "autopeft_serial" in name:
            kind = "serial"
        elif "autopeft_parallel" in name:
            kind = "parallel"
        elif "autopeft_prefix" in name:
            kind = "prefix"
        elif "autopeft_ia3" in name or ".ia3_l." in name:  # HF PEFT's IA3 vectors too (benchmarks)
            kind = "ia3"
        elif name.endswith("bias") and "classifier" not in name and "score" not in name:
            kind = "bitfit"
        else:
            kind = "head"
        groups.setdefault(kind, []).append(p)
    return [{"params": ps, "lr": fidelity.lr or DEFAULT_LR[k], "name": k} for k, ps in groups.items()]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=not enabled or not sys.stderr.isatty())


@torch.no_grad()
def evaluate(model: nn.Module, ids: list[list[int]], labels: Sequence, task: TaskData, batch_size: int,
             pad_id: int, device: torch.device) -> dict[str, float]:
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # sorted: least padding, same result
    causal = is_causal(model)
    preds: list[Any] = [None] * len(ids)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        with autocast:
            logits = model(**collate(ids, idx, pad_id, device, causal=causal)).logits.float()
        out = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
        for i, p in zip(idx, out.cpu().tolist()):
            preds[i] = p
    return compute_metrics(task, preds, list(labels))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_TEMPLATE: dict[tuple, tuple[nn.Module, Any]] = {}


def seeded_backbone(backbone: str | None, task: TaskData, dtype: torch.dtype, seed: int, *,
                    share: bool = False) -> tuple[nn.Module, Any]:
    """The backbone with its new task head drawn from `seed`: exactly what seeding and then loading gives.

    A search loads the same backbone for every trial; from disk that is 0.2-1 s of a 10-20 s CPU trial. So the
    first load (under the seed) is kept as a template on the CPU, and each trial gets a copy of it, which is
    the same model, head included, in milliseconds. One template per process (the last one asked for).

    With `share`, the copy's parameters are new `nn.Parameter`s over the template's storage (its own
    `requires_grad` flags, no data copied): a trial only trains its adapters, and copying the frozen 22M
    parameters of MiniLM was 60-100 ms of every trial's overhead. The caller must then call `own_trainables`
    once the trainable parameters are chosen, before anything trains them in place.
    """
    key = (resolve_backbone(backbone), task.num_labels, task.is_regression, dtype, seed)
    if key not in _TEMPLATE:
        _TEMPLATE.clear()
        _seed_everything(seed)
        _TEMPLATE[key] = load_backbone(backbone, task.num_labels, regression=task.is_regression, dtype=dtype)
        dropout.install(_TEMPLATE[key][0])  # keyed by trial, step and row: a pack draws what a trial alone does
    model, tokenizer = _TEMPLATE[key]
    if not share:
        return copy.deepcopy(model), tokenizer
    memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()}
    memo |= {id(b): b for b in model.buffers()}  # never written: position ids, token type ids
    return copy.deepcopy(model, memo), tokenizer


def own_trainables(model: nn.Module) -> None:
    """Give every trainable parameter that still shares the template's storage (the head, BitFit's biases and
    LayerNorms) a copy of its own, so training it in place cannot leak into the next trial."""
    shared = {p.data_ptr() for template, _ in _TEMPLATE.values() for p in template.parameters()}
    for p in model.parameters():
        if p.requires_grad and p.data_ptr() in shared:
            p.data = p.data.clone()


def run_trial(cfg: TrialConfig, *, task: TaskData | None = None, select: str = "dev",
              heldout_fraction: float = 0.1, device: str | None = None, kernel_mode: str = "auto",
              progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> TrialResult:
    """Train `cfg.spec` on `cfg.task` at `cfg.fidelity` and measure it.

    `select="heldout"` is the search's honest mode: the score (`metrics.metric`) comes from a seeded
    held-out part of the training data, and the dev set is measured beside it (`metrics.dev_metric`) but
    never used to choose. `select="dev"` scores on the dev set (retraining a chosen config).
    """
    task = task or cfg.data.load(cfg.task)
    kernels.set_kernels(kernel_mode)
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, tokenizer = seeded_backbone(cfg.backbone, task, dtype, cfg.fidelity.seed, share=True)
    num_layers = model.config.num_hidden_layers
    spec = cfg.spec if isinstance(cfg.spec, PeftSpec) else PeftSpec.from_dict(cfg.spec, num_layers=num_layers)
    _seed_everything(cfg.fidelity.seed)  # adapter init depends only on the seed, not on how the backbone loaded
    info = inject(model, spec)
    own_trainables(model)
    metrics, losses = train_and_evaluate(
        model, tokenizer, task, cfg.fidelity, backbone_params=info.backbone_params,
        cache_tag=(resolve_backbone(cfg.backbone), task.name, task.source), label=spec.summary(), select=select,
        heldout_fraction=heldout_fraction, device=dev, progress=progress, on_step=on_step)
    return TrialResult(metrics, model, spec, losses)


def train_and_evaluate(model: nn.Module, tokenizer: Any, task: TaskData, fid: Fidelity, *, backbone_params: int,
                       cache_tag: tuple, label: str = "", select: str = "dev", heldout_fraction: float = 0.1,
                       device: torch.device | None = None, progress: bool = True,
                       on_step: Callable[[int, float], None] | None = None) -> tuple[Metrics, list[float]]:
    """The training loop and measurements for any model whose trainable parameters are already set.

    Kept apart from `run_trial` so a benchmark can run an HF PEFT model through exactly the same loop.
    """
    if select not in ("dev", "heldout"):
        raise ValueError(f"select must be 'dev' or 'heldout', not {select!r}")
    dev = device or pick_device()
    for p in model.parameters():  # trainable tensors in fp32 (AdamW state too); frozen ones stay as loaded
        if p.requires_grad:
            p.data = p.data.float()
    model.to(dev)

    train_split, select_split = trial_splits(task, fid, select, heldout_fraction, cache_tag)
    train_ids = tokenize(tokenizer, train_split, fid.max_length,
                         (*cache_tag, "train", select, fid.seed, heldout_fraction, fid.train_examples))
    pad_id = tokenizer.pad_token_id
    rng = random.Random(fid.seed)
    steps_per_epoch = math.ceil(len(train_ids) / fid.batch_size)
    total_steps = fid.max_steps or max(1, math.ceil(steps_per_epoch * fid.epochs))
    warmup = int(total_steps * fid.warmup_ratio)
    graphs = use_cuda_graphs(fid.cuda_graphs, dev)  # "on" off CUDA: a UserError before anything trains
    # fused AdamW on CUDA: one launch for all parameters instead of a foreach chain (steps are launch-bound)
    optimizer = torch.optim.AdamW(_param_groups(model, fid), weight_decay=fid.weight_decay,
                                  fused=True if dev.type == "cuda" else None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup
                                                 else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    labels = torch.tensor(train_split.label, dtype=torch.float32 if task.is_regression else torch.long)
    # no cast cache under graphs: a cached bf16 copy of a trainable weight would be baked into the graph
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphs) if dev.type == "cuda"
                else _null())
    trainable = [p for p in model.parameters() if p.requires_grad]
    causal = is_causal(model)

    def forward_backward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != dropout.KEYS}
        with autocast, dropout.rows(batch.get(dropout.KEYS)):
            loss = model(**inputs).loss
        loss.backward()
        return loss

    model.train()
    fault = injected_fault()
    graphed = GraphedStep(forward_backward, trainable) if graphs and trainable else None
    mem: PeakMemory | None = None
    losses: list[float] = []
    reader = LaggedLoss(dev)
    tokens = 0
    step = 0
    bar = _progress(total_steps, f"train {label[:40]}", progress)

    def settle(done: tuple[int, float] | None) -> None:
        """Record a step's loss once its value is on the host (one step late: see LaggedLoss)."""
        if done is None:
            return
        at, value = done
        if not math.isfinite(value):
            raise TrialFailed("nan", f"loss became {value} at step {at}")
        losses.append(value)
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        if on_step:
            on_step(at + 1, value)

    try:
        with PeakMemory(dev) as mem:
            t0 = time.perf_counter()
            while step < total_steps:
                for idx in length_bucketed_batches([len(x) for x in train_ids], fid.batch_size, rng):
                    if step >= total_steps:
                        break
                    width = bucket_length(max(len(train_ids[i]) for i in idx), fid.max_length) if graphed else None
                    batch = collate(train_ids, idx, pad_id, dev, width=width, causal=causal)
                    batch["labels"] = labels[idx].to(dev)
                    batch[dropout.KEYS] = dropout.row_keys(fid.seed, step, len(idx)).to(dev)
                    if graphed is not None and graphed.active and len(idx) == fid.batch_size:
                        loss = graphed(batch)  # a new shape: warm-up step + capture; else one replay
                        if graphed.failure is not None:
                            _graphs_failed(model, graphed.failure, fid.cuda_graphs, label)
                    else:  # CPU, graphs off, or a batch of another size (the last, partial one)
                        loss = forward_backward(batch)
                    if fault == "oom":  # a simulated allocator failure, exactly where a real one would surface
                        raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by {FAULT_ENV})")
                    if fault == "nan":
                        loss = loss * float("nan")
                    settle(reader.push(step, loss))  # the previous step's loss, read without waiting for this one
                    if fid.grad_clip:
                        torch.nn.utils.clip_grad_norm_(trainable, fid.grad_clip)
                    optimizer.step()
                    schedule.step()
                    if graphed is not None:
                        graphed.zero_grad()  # in place: the graphs accumulate into these very tensors
                    else:
                        optimizer.zero_grad(set_to_none=True)
                    tokens += sum(len(train_ids[i]) for i in idx)  # real tokens, not padding (and no sync)
                    step += 1
                    bar.update(1)
            settle(reader.pop())
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            train_s = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError as exc:  # the same class as torch.OutOfMemoryError
        raise TrialFailed("oom", str(exc).splitlines()[0], memory_mb=_memory_at_failure(dev, mem)) from None
    finally:
        bar.close()
        if graphed is not None:  # the graphs' pool and the static gradients are not needed by evaluation
            graphed.release()
            optimizer.zero_grad(set_to_none=True)

    t1 = time.perf_counter()
    sel_ids = tokenize(tokenizer, select_split, fid.max_length, (*cache_tag, select, fid.seed, heldout_fraction))
    scores = evaluate(model, sel_ids, select_split.label, task, fid.eval_batch_size, pad_id, dev)
    dev_metric = None
    if select == "heldout":
        dev_ids = tokenize(tokenizer, task.dev, fid.max_length, (*cache_tag, "dev"))
        dev_metric = evaluate(model, dev_ids, task.dev.label, task, fid.eval_batch_size, pad_id, dev)[task.metric_name]
    eval_s = time.perf_counter() - t1
    # on CUDA, whether the step ran as CUDA graphs (1) or eagerly (0: off, or a capture failed under auto)
    used = graphed is not None and graphed.active and graphed.captures > 0
    graph_flag = {"cuda_graphs": float(used)} if dev.type == "cuda" else {}
    main = scores[task.metric_name]
    if not math.isfinite(main):
        raise TrialFailed("nan", f"{task.metric_name} is {main}")
    metrics = Metrics(
        metric_name=task.metric_name, metric=main, trainable_params=sum(p.numel() for p in trainable),
        backbone_params=backbone_params, peak_memory_mb=mem.peak_mb, train_seconds=train_s,
        eval_seconds=eval_s, tokens_per_s=tokens / train_s if train_s > 0 else 0.0,
        train_loss=float(np.mean(losses[-max(1, len(losses) // 10):])), steps=step,
        extra={k: v for k, v in scores.items() if k != task.metric_name} | graph_flag, dev_metric=dev_metric)
    return metrics, losses
