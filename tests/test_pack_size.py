"""How many trials a pack holds (`autopeft/pack_size.py`): the flag's values, the estimate, and the replanning
from measured packs that `--pack-size auto` relies on."""

from __future__ import annotations

import pytest
import torch

from autopeft import pack_size
from autopeft.errors import UserError
from autopeft.pack_size import AUTO, AUTO_MAX_PACK, PackPlanner, most_trials, packs, parse_pack_size, plan_pack_size

CUDA = torch.device("cuda")


@pytest.mark.parametrize(("given", "want"), [("auto", AUTO), ("AUTO ", AUTO), ("8", 8), (3, 3), (1, 1), (2.0, 2)])
def test_a_pack_size_is_a_positive_integer_or_auto(given: object, want: object) -> None:
    assert parse_pack_size(given) == want


@pytest.mark.parametrize("bad", ["0", 0, -2, "many", 2.5, None])
def test_a_bad_pack_size_names_the_flag_and_the_choices(bad: object) -> None:
    with pytest.raises(UserError, match=r"--pack-size must be a positive integer or auto"):
        parse_pack_size(bad)


def test_auto_packs_and_proposes_its_largest_pack_at_once() -> None:
    assert packs(AUTO) and packs(2) and not packs(1)
    assert most_trials(AUTO) == AUTO_MAX_PACK and most_trials(3) == 3


def test_plan_pack_size_fills_the_budget() -> None:
    assert plan_pack_size(80_000, backbone_mb=2_000, per_trial_mb=9_000) == 8
    assert plan_pack_size(80_000, backbone_mb=2_000, per_trial_mb=100_000) == 1  # alone, as unpacked
    assert plan_pack_size(80_000, backbone_mb=2_000, per_trial_mb=10, max_size=16) == 16


def test_the_estimate_is_the_backbone_plus_korthikantis_activations_per_trial() -> None:
    """roberta-large size at 32 x 128 tokens in bf16: 355M parameters, 34 bytes per token, unit and layer."""
    p = PackPlanner.estimated(CUDA, backbone_params=355_000_000, hidden=1024, num_layers=24, batch_size=32,
                              max_length=128)
    assert p.backbone_mb == pytest.approx(355e6 * 2 / 2**20)
    assert p.per_trial_mb == pytest.approx(34 * 32 * 128 * 1024 * 24 / 2**20)  # 3,264 MiB
    fp32 = PackPlanner.estimated(CUDA, backbone_params=355_000_000, hidden=1024, num_layers=24, batch_size=32,
                                 max_length=128, bf16=False)
    assert fp32.per_trial_mb == pytest.approx(2 * p.per_trial_mb) and not p.measured


@pytest.fixture
def budget(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The device's plannable memory, set by the test (a list, so a test can change it between packs)."""
    limit = [20_000.0]
    monkeypatch.setattr(pack_size, "device_budget_mb", lambda device: limit[0] if device.type == "cuda" else None)
    return limit


def test_measured_packs_replace_the_estimate_and_the_largest_increment_wins(budget: list[float]) -> None:
    p = PackPlanner(CUDA, backbone_mb=1_000, per_trial_mb=6_000)
    assert p.size() == 3  # (20,000 - 1,000) // 6,000 from the estimate
    p.observe(3, peak_mb=1_400 + 3 * 1_000, backbone_mb=1_400)  # measured: 1,000 a trial, not 6,000
    assert p.measured and p.size() == 8  # (20,000 - 1,400) // (1.6 x 1,000) = 11, at most AUTO_MAX_PACK
    p.observe(8, peak_mb=1_400 + 8 * 2_500, backbone_mb=1_400)  # heavier trials: 2,500 a trial
    p.observe(4, peak_mb=1_400 + 4 * 500, backbone_mb=1_400)  # a lighter pack does not lower the plan
    assert p.per_trial_mb == 2_500 and p.size() == 4  # 18,600 // 4,000
    budget[0] = 9_400  # another process took memory: the next plan shrinks with what is left
    assert p.size() == 2
    assert p.sizes == [3, 8, 4, 2]


def test_running_out_of_memory_halves_every_later_pack(budget: list[float]) -> None:
    p = PackPlanner(CUDA, backbone_mb=1_000, per_trial_mb=1_000)
    assert p.size() == 8
    p.observe(8, peak_mb=0.0, backbone_mb=0.0, out_of_memory=True)
    assert p.size() == 4
    p.observe(4, peak_mb=1_000 + 4 * 100, backbone_mb=1_000)  # measured small afterwards: still at most 4
    assert p.size() == 4
    p.observe(4, peak_mb=0.0, backbone_mb=0.0, out_of_memory=True)
    p.observe(2, peak_mb=0.0, backbone_mb=0.0, out_of_memory=True)
    p.observe(1, peak_mb=0.0, backbone_mb=0.0, out_of_memory=True)
    assert p.size() == 1  # never below one trial


def test_nothing_measured_changes_nothing_and_a_cpu_packs_one(budget: list[float]) -> None:
    p = PackPlanner(CUDA, backbone_mb=1_000, per_trial_mb=6_000)
    p.observe(3, peak_mb=120.0, backbone_mb=0.0)  # a CPU pack: no backbone figure
    assert not p.measured and p.per_trial_mb == 6_000
    assert PackPlanner(torch.device("cpu"), backbone_mb=1, per_trial_mb=1).size() == 1
