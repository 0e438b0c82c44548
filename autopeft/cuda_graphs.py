"""The training step as a CUDA graph, without torch.compile: one launch for forward + loss + backward.

Why: on a GPU a PEFT step of an encoder is bound by host-side launch work, not by the GPU. Measured on an
H200 at roberta-large size (batch 32 x 128, LoRA r8 on all linears): the frozen floor (forward + input-grad
backward) takes 29.2 ms, our eager step 75.8 ms; under torch.compile(mode="reduce-overhead") 31.2 ms. But a
search builds a new model every ~10 s trial and cannot pay compile's tens of seconds per trial. A CUDA graph
captured by hand costs about one step to record, and replays the whole forward and backward as one launch.

What is in the graph and what is not: the graph holds forward, loss and backward (gradients accumulated into
the parameters' `.grad`). The optimizer step, gradient clipping and the LR schedule stay outside: they change
Python-side state (the schedule's lr, AdamW's step count) that a graph would freeze.

The rules a captured step lives by (`GraphedStep` keeps them):

* Fixed shapes: one graph per input shape, captured on the first batch of that shape. The trainer pads each
  batch's length up to a few bucket lengths (`bucket_length`) so a trial needs only a handful of graphs.
* Static buffers: each graph reads its inputs from its own tensors; a replay first copies the batch in.
* Static gradients: every trainable parameter gets a zero `.grad` before the first capture (views of one
  buffer, `kernels.casts.share_gradients`, into which the adapters' gradients add in one kernel), and every graph
  accumulates into those very tensors. Zero them in place after the optimizer step (`zero_grad`); setting them
  to None would leave the graphs writing into tensors nobody reads.
* Warm-up: the first batch of a shape runs eagerly on a side stream (lazy initialisation, library handles and
  autotuning happen outside the capture, as PyTorch's docs ask) and that run *is* the training step for that
  batch; the capture that follows records without executing, so no work is wasted or done twice.
* One memory pool for all of a trial's graphs (the graphs never run at the same time), so graphed peak memory
  stays that of the largest eager step; each replay's loss is copied out at once (another graph's replay may
  reuse the pool).
* Autocast inside a capture must not cache casts (`cache_enabled=False`): a cached cast of a trainable weight
  would be baked into the graph and go stale after the first optimizer step. The caller's step function does
  its own autocast.
* A capture that fails (an op that syncs with the host, an unsupported op) leaves the step eager from then on:
  `failure` says why, and the caller decides whether that is fatal ("on") or a warning ("auto").

Trial packing (autopeft/packing.py) uses it too, for the packed step of K trials (`packing._static_steps`).
Its eager step broke these rules in four places, each fixed there: the NaN check read every trial's loss on
the host between forward and backward (now the backward's root is the sum of all the trials' losses and the
losses are read one step late); the stacked parameters handed their gradient out in a Python hook (now static
stack gradients, handed out once as views: `_Stack.make_static`); `PackState.layout` built its index tensor
inside the forward (now built before the step and kept per composition); and the pack's shape changes as
trials leave (now one `GraphedStep` per composition of trials, dropped and captured anew when one leaves).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from autopeft import kernels
from autopeft.errors import UserError
from autopeft.kernels import casts
from autopeft.spec import CUDA_GRAPH_MODES

#: the shortest bucket: padding a short batch up to 32 tokens costs nothing on a launch-bound step
MIN_BUCKET = 32


def bucket_length(longest: int, max_length: int) -> int:
    """The padded length of a batch whose longest example has `longest` tokens: at most `max_length`.

    Quarter-octave buckets: multiples of 32 up to 256 (32, 64, ..., 256), then steps of 1/8 of the next power
    of two (320, 384, 448, 512; 640, ...). A graph per bucket means few captures (4 for max_length 128, 12
    for 512), each costing about one step; padding adds at most 31 tokens below 256 and under 25% above, and
    a short batch is cheap anyway where a step is launch-bound. Powers of two would halve the captures but
    pad up to 2x; multiples of 32 everywhere would need 32 captures at 1024 tokens.
    """
    if longest <= 0:
        raise ValueError(f"a batch needs at least one token, got longest={longest}")
    step = max(MIN_BUCKET, 2 ** (math.ceil(math.log2(longest)) - 3))
    return min(max_length, -(-longest // step) * step)


def use_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether a trial on `device` should try a graphed step: "auto" and "on" on CUDA, never elsewhere.

    "on" off CUDA is a user error (one line, exit 2), raised before anything trains."""
    if mode not in CUDA_GRAPH_MODES:
        raise UserError(f"--cuda-graphs must be one of {', '.join(CUDA_GRAPH_MODES)}, not {mode!r}")
    if mode == "off":
        return False
    if device.type != "cuda":
        if mode == "on":
            raise UserError(f"--cuda-graphs on needs a CUDA device, this run is on {device.type}; use auto or off")
        return False
    return True


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the static buffers the graph reads
    loss: torch.Tensor  # the static output the graph writes


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every warm-up and capture of the process: each new stream gets its own
    cuBLAS workspace (tens of MiB, kept for the process's life), so a stream per trial would leak memory."""
    return torch.cuda.Stream(device=device)


def _key(inputs: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())


class StaticGradients:
    """The gradients a graphed step accumulates into: every parameter gets a zero `.grad` once, and those very
    tensors must stay its `.grad` (zeroed in place, never replaced or set to None) while the step is in use,
    since a graph's replay writes to the addresses it was captured with. Shared by `GraphedStep` and by the
    packing's uncaptured stand-in, which must fail where a graph would go wrong."""

    def __init__(self, forward_backward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                 params: Sequence[torch.Tensor]) -> None:
        self._fn = forward_backward
        self._params = list(params)
        kinds: dict[tuple, list[torch.Tensor]] = {}
        for p in self._params:
            if p.grad is None:
                kinds.setdefault((p.dtype, p.device), []).append(p)
        # a buffer per dtype, so the adapters' gradients add in one kernel and zero in one
        self._buffers = [casts.share_gradients(bare) for bare in kinds.values()]
        self._grads = [p.grad for p in self._params]
        shared = {id(p) for bare in kinds.values() for p in bare}
        self._loose = [p.grad for p in self._params if id(p) not in shared]
        self.captures = 0
        self.replays = 0

    def zero_grad(self) -> None:
        """Zero the static gradients in place (after the optimizer step): the graphs keep writing into them."""
        self._check_grads()
        for buf in self._buffers:
            buf.zero_()
        if self._loose:
            torch._foreach_zero_(self._loose)

    def release(self) -> None:
        """Drop the hold on the static gradients (and whatever a subclass keeps for them); the step is unusable
        afterwards."""
        self._params, self._grads, self._buffers, self._loose = [], [], [], []

    def _check_grads(self) -> None:
        if any(p.grad is not g for p, g in zip(self._params, self._grads)):
            raise RuntimeError("a parameter's .grad was replaced while CUDA graphs accumulate into it; zero "
                               "gradients in place (optimizer.zero_grad(set_to_none=False))")


class GraphedStep(StaticGradients):
    """`step(inputs)` = `forward_backward(inputs)` (loss of the batch, gradients accumulated into `.grad`), run
    as a CUDA graph per input shape.

    `forward_backward` must compute the loss and call `backward()` on it, and return the loss; it must not
    read tensor values on the host (no `.item()`, no `if tensor:`), which a capture cannot record. The first
    call for a shape runs it eagerly (the warm-up, a real step) and captures it; later calls replay. Returns a
    loss tensor of the caller's own (a copy of the graph's output).
    """

    def __init__(self, forward_backward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                 params: Sequence[torch.Tensor]) -> None:
        if not params or not all(p.is_cuda for p in params):
            raise ValueError("GraphedStep needs trainable parameters on a CUDA device")
        super().__init__(forward_backward, params)
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._side = _side_stream(self._params[0].device)
        self.failure: str | None = None  # why the step went eager for good (a failed capture), else None

    @property
    def active(self) -> bool:
        """True while graphs are in use (no capture has failed)."""
        return self.failure is None

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self._check_grads()
        key = _key(inputs)
        g = self._graphs.get(key)
        if g is not None:
            for name, t in inputs.items():
                g.inputs[name].copy_(t, non_blocking=True)
            g.graph.replay()
            self.replays += 1
            return g.loss.clone()  # the pool is shared: the next replay of any graph may overwrite g.loss
        if self.failure is not None:
            return self._fn(dict(inputs)).detach()
        static = {name: t.detach().clone() if t.is_cuda else t.to(self._params[0].device) for name, t in
                  inputs.items()}
        loss = self._warm_up(static)
        try:
            self._graphs[key] = self._capture(static)
            self.captures += 1
        except Exception as exc:  # an op the capture cannot record: eager from now on, the caller decides
            self._give_up(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        return loss

    def release(self) -> None:
        """Drop the graphs, their memory pool and the hold on the static gradients (before evaluation, or when
        the trial ends); the step is unusable afterwards."""
        self._graphs.clear()
        super().release()

    def _warm_up(self, static: dict[str, torch.Tensor]) -> torch.Tensor:
        """One real step, eagerly, on a side stream (PyTorch's recipe before a capture)."""
        current = torch.cuda.current_stream()
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side), kernels.graphed():
            loss = self._fn(static).detach()
        current.wait_stream(self._side)
        # copied on the caller's stream; the side stream's blocks are reused only after it waits for the caller
        return loss.clone()

    def _capture(self, static: dict[str, torch.Tensor]) -> _Graph:
        """Record `forward_backward` on `static` into a graph (nothing executes)."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # blocks cached for the side stream are of no use to the graph's pool
        graph = torch.cuda.CUDAGraph()
        self._side.wait_stream(torch.cuda.current_stream())
        # torch.cuda.graph would leave the capture stream current if capture_end raised: driven by hand, a
        # failed capture always restores the caller's stream and reports the op that failed, not the aftermath
        with torch.cuda.stream(self._side), kernels.graphed():
            graph.capture_begin(pool=self._pool)
            try:
                loss = self._fn(static).detach()
            except BaseException:
                try:
                    graph.capture_end()
                except Exception:  # the capture is invalid by now; the error worth reporting is the one above
                    pass
                raise
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(self._side)
        return _Graph(graph, static, loss)

    def _give_up(self, reason: str) -> None:
        self.failure = reason
        self._graphs.clear()
        torch.cuda.synchronize()  # a device left broken by the capture fails here, loudly, not later
