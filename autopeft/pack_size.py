"""How many trials one pack holds (`--pack-size K` or `--pack-size auto`).

Why a planner: a pack's memory grows with each trial's activations and adapter state, on top of the backbone it
shares. A fixed K either wastes a large GPU or runs a small one out of memory, and K trials that fail `oom` together
cost K trials. `auto` starts from an estimate and replans from what packs actually used:

* Estimate, before any pack: the backbone's parameters in the compute dtype, and per trial the activations of
  Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer Models") without
  recomputation, 34 bytes per token, hidden unit and layer in 16-bit (twice that in fp32), with no attention
  matrix stored (SDPA). For a frozen backbone that should be an upper bound (its linears keep no inputs for
  weight gradients), so the first pack is smaller than the device allows: 26,112 MiB a trial estimated at
  roberta-large size and 256 x 128 tokens, against 10,721 to 17,280 measured.
* Measure, after each pack: the memory allocated once the backbone is on the device, and the pack's peak,
  give the increment per trial, `(peak - backbone) / K` (`PackStats`). The largest increment seen so far,
  times `HEADROOM`, plans the next pack, since trials differ (methods, ranks, prefix lengths, the longest
  batch). In one study on an H200 (bench/results/pack_size_auto_noheadroom-h200-2026-11-30.json) packs measured
  12,274, 17,280 and 10,721 MiB a trial, and a pack of 8 planned from the first (no headroom) peaked at 97% of
  the device.
* A pack that runs out of memory halves the most the planner will ever propose again.

K stays within [1, `AUTO_MAX_PACK`], and is 1 off CUDA, where nothing is shared by packing that a CPU could use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autopeft.errors import UserError

if TYPE_CHECKING:  # torch is imported where memory is read: the CLI parses --pack-size without it
    import torch

AUTO = "auto"
#: the most trials `auto` puts in one pack, and the q-batch BoTorch proposes for it. Past 8, a pack's padding (every
#: trial to the widest example) and its per-segment work (prefixes, heads) grow while the step was already no
#: faster than a graphed single trial at 8 (bench/results/packing_rowscale-h200-2026-11-30.json)
AUTO_MAX_PACK = 8
#: the share of the device's memory (free, plus what this process's allocator holds) a pack may plan to fill; the
#: rest is the allocator's fragmentation and the evaluation after training
MEMORY_SHARE = 0.85
#: the factor on the largest measured increment per trial that plans a pack: the spread of pack means seen in one
#: study (10,721 to 17,280 MiB a trial, bench/results/pack_size_auto_noheadroom-h200-2026-11-30.json) is 1.6x
HEADROOM = 1.6
#: activation bytes per token, hidden unit and layer for 16-bit activations (Korthikanti et al. 2022, without
#: recomputation and without the attention matrix)
ACTIVATION_BYTES_16BIT = 34


def parse_pack_size(value: Any, what: str = "--pack-size") -> int | str:
    """A pack size as a user gives it (flag, preset, saved study options): a positive integer or `auto`."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        k = int(value)
        if k != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a positive integer or auto, got {value!r}") from None
    if k < 1:
        raise UserError(f"{what} must be a positive integer or auto, got {value!r}")
    return k


def packs(pack_size: int | str) -> bool:
    """True when trials train in packs (the packed search loop), False for one trial at a time."""
    return pack_size == AUTO or int(pack_size) > 1


def most_trials(pack_size: int | str) -> int:
    """The largest pack this setting can form: what BoTorch proposes per GP fit (one q-batch per pack)."""
    return AUTO_MAX_PACK if pack_size == AUTO else int(pack_size)


def plan_pack_size(limit_mb: float, *, backbone_mb: float, per_trial_mb: float, max_size: int = 16) -> int:
    """How many trials fit in `limit_mb`: the shared backbone once, plus `per_trial_mb` for each trial. At least 1
    (a trial that does not fit alone runs, and fails `oom`, unpacked as before); at most `max_size`."""
    if per_trial_mb <= 0:
        return max_size
    return max(1, min(max_size, int((limit_mb - backbone_mb) // per_trial_mb)))


def device_budget_mb(device: torch.device) -> float | None:
    """The MiB a pack may fill on `device` now (`MEMORY_SHARE` of what other processes leave); None off CUDA."""
    if device.type != "cuda":
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return MEMORY_SHARE * (free + torch.cuda.memory_reserved(device)) / 2**20


@dataclass
class PackPlanner:
    """`--pack-size auto`: the next pack's size, from the estimate until a pack was measured, then from packs.

    `backbone_mb` and `per_trial_mb` start as estimates (`estimated`); `observe` replaces them with a pack's
    measurement and `sizes` records what was planned, for the search's summary line."""

    device: torch.device
    backbone_mb: float
    per_trial_mb: float
    max_size: int = AUTO_MAX_PACK
    measured: bool = False
    sizes: list[int] = field(default_factory=list)

    @classmethod
    def estimated(cls, device: torch.device, *, backbone_params: int, hidden: int, num_layers: int, batch_size: int,
                  max_length: int, bf16: bool = True) -> PackPlanner:
        bytes_per = 2 if bf16 else 4
        act = ACTIVATION_BYTES_16BIT * bytes_per / 2
        return cls(device, backbone_mb=backbone_params * bytes_per / 2**20,
                   per_trial_mb=act * batch_size * max_length * hidden * num_layers / 2**20)

    def size(self) -> int:
        limit = device_budget_mb(self.device)
        per_trial = self.per_trial_mb * (HEADROOM if self.measured else 1.0)
        k = 1 if limit is None else plan_pack_size(limit, backbone_mb=self.backbone_mb, per_trial_mb=per_trial,
                                                   max_size=self.max_size)
        self.sizes.append(k)
        return k

    def observe(self, size: int, peak_mb: float, backbone_mb: float, out_of_memory: bool = False) -> None:
        """A pack of `size` trials peaked at `peak_mb` with `backbone_mb` allocated before its trials trained
        (both as `PackStats` reports them; 0 where nothing was measured, off CUDA)."""
        if out_of_memory:
            self.max_size = max(1, size // 2)
            return
        if size < 1 or backbone_mb <= 0 or peak_mb <= backbone_mb:
            return
        per_trial = (peak_mb - backbone_mb) / size
        self.per_trial_mb = per_trial if not self.measured else max(self.per_trial_mb, per_trial)
        self.backbone_mb = backbone_mb
        self.measured = True
