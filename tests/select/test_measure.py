"""Pure pieces of the candidate measurement: when and which static Ks are pruned."""

from __future__ import annotations

import pytest

from dspark.errors import DsparkError
from dspark.select.measure import SelectConfig, prune_methods, prune_point


def test_prune_point_is_a_quarter_of_the_prompts_but_at_least_three():
    assert [prune_point(n) for n in (1, 2, 3, 8, 12, 20, 40)] == [1, 2, 3, 3, 3, 5, 10]


def test_prune_drops_static_ks_behind_the_fastest_method_by_the_margin():
    tps = {"auto": 100.0, "k1": 95.0, "k2": 86.0, "k4": 84.9, "k6": 50.0, "candidate": 10.0}
    assert prune_methods(tps, 0.15) == ["k4", "k6"]  # 85.0 is the cut; auto and the candidate's form stay
    assert prune_methods(tps, 0.6) == []


def test_prune_always_keeps_the_fastest_static_k():
    assert prune_methods({"auto": 200.0, "k1": 90.0, "k2": 80.0}, 0.15) == ["k2"]
    assert prune_methods({"auto": 200.0}, 0.15) == []


def test_seed_range_is_checked_before_anything_loads():
    """Prompt i samples with seed + i: a seed torch refuses failed mid-run, after the target loaded."""
    assert SelectConfig(n=4, seed=2**63 - 4).seed == 2**63 - 4
    for bad in (-1, 2**63 - 3, 2**64):
        with pytest.raises(DsparkError, match=r"--seed must be in \[0, 2\*\*63 - 4\]"):
            SelectConfig(n=4, seed=bad)


def test_prune_margin_is_checked():
    assert SelectConfig(prune_margin=None).prune_margin is None
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(DsparkError, match="prune margin"):
            SelectConfig(prune_margin=bad)
