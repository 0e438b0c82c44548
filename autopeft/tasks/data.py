"""The currencies of task data: a `Split` of examples and a `TaskData` (train + dev + how to score)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    """Parallel lists, so a tokenizer takes a whole split in one call. `text_pair` is None for one-text tasks."""

    text: list[str]
    label: list[int] | list[float]
    text_pair: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.text) != len(self.label) or (self.text_pair is not None and len(self.text_pair) != len(self.text)):
            raise ValueError("split columns have different lengths")

    def __len__(self) -> int:
        return len(self.text)

    def subset(self, idx: Sequence[int]) -> Split:
        return Split([self.text[i] for i in idx], [self.label[i] for i in idx],
                     None if self.text_pair is None else [self.text_pair[i] for i in idx])


@dataclass(frozen=True)
class TaskData:
    """A loaded task. `source` names where the data came from, so caches and studies can tell data apart."""

    name: str
    train: Split
    dev: Split
    num_labels: int
    label_names: list[str]
    metric_name: str
    is_regression: bool = False
    source: str = ""


def holdout_split(split: Split, fraction: float, seed: int, *, regression: bool | None = None) -> tuple[Split, Split]:
    """(train, held-out): a seeded split of the training data, stratified by label for classification.

    The search selects on the held-out part so that the dev set it reports was never used to choose; the
    stratification keeps small held-out sets from drifting in label balance between studies.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), not {fraction}")
    n = len(split)
    if n < 2:
        raise ValueError("need at least 2 training examples to carve a held-out split")
    rng = random.Random(seed)
    is_reg = regression if regression is not None else any(isinstance(y, float) for y in split.label)
    groups: dict[object, list[int]] = defaultdict(list)
    for i, y in enumerate(split.label):
        groups[None if is_reg else y].append(i)
    held: list[int] = []
    for key in sorted(groups, key=repr):
        members = groups[key]
        rng.shuffle(members)
        held.extend(members[:round(len(members) * fraction)])
    held_set = set(held)
    if not held_set or len(held_set) == n:  # tiny splits: always leave at least one example on each side
        order = list(range(n))
        rng.shuffle(order)
        held_set = set(order[:max(1, min(n - 1, round(n * fraction)))])
    train_idx = [i for i in range(n) if i not in held_set]
    return split.subset(train_idx), split.subset(sorted(held_set))
