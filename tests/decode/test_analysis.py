"""Speculative-decoding arithmetic against known values and identities (Leviathan et al. 2023)."""

import random

import pytest

from dspark.decode import analysis
from dspark.decode.analysis import (acceptance_from_counts, acceptance_from_mean_tokens, analytical_speedup,
                                    best_draft_length, best_k, cost_ratio, expected_tokens, fraction_of,
                                    interpolate_cost, median_seconds, relative_costs, speedup_bound)
from dspark.errors import DsparkError


@pytest.mark.parametrize("k", [0, 1, 2, 5, 16])
def test_no_acceptance_gives_one_token_per_step(k):
    assert expected_tokens(0.0, k) == 1.0


@pytest.mark.parametrize("k", [1, 3, 8])
def test_full_acceptance_limit_is_k_plus_one(k):
    assert expected_tokens(1.0, k) == k + 1
    assert expected_tokens(1 - 1e-9, k) == pytest.approx(k + 1, rel=1e-6)


@pytest.mark.parametrize("a,k", [(0.3, 1), (0.6, 4), (0.8, 4), (0.95, 10)])
def test_expected_tokens_is_the_geometric_sum(a, k):
    assert expected_tokens(a, k) == pytest.approx(sum(a ** i for i in range(k + 1)), rel=1e-12)


def test_known_values():
    # (1 - 0.8^5) / 0.2 = 3.3616; with c = 0.05, v = 1: 3.3616 / 1.2
    assert expected_tokens(0.8, 4) == pytest.approx(3.3616)
    assert analytical_speedup(0.8, 4, 0.05) == pytest.approx(3.3616 / 1.2)
    assert speedup_bound(0.8, 4, 0.05) == pytest.approx(3.3616 / 1.2)
    assert speedup_bound(0.8, 4, 0.05, {1: 1.0, 5: 1.5}) == pytest.approx(3.3616 / 1.7)


def test_expected_tokens_matches_simulation():
    rng = random.Random(0)
    a, k, steps = 0.7, 3, 40000
    total = 0
    for _ in range(steps):
        n = 0
        while n < k and rng.random() < a:
            n += 1
        total += n + 1  # accepted drafts + the recovered or bonus token
    assert total / steps == pytest.approx(expected_tokens(a, k), abs=0.02)


def test_target_only_bound_is_one():
    assert speedup_bound(0.0, 0, 0.0) == 1.0
    assert speedup_bound(0.5, 0, 0.3, {1: 1.0, 2: 1.1}) == 1.0


def test_best_k_monotone_in_acceptance():
    for c in (0.02, 0.1, 0.3):
        ks = [best_k(a / 100, c, k_max=16) for a in range(0, 100, 3)]
        assert ks == sorted(ks), (c, ks)
        assert ks[0] == 1
    assert best_k(0.99, 0.01, k_max=16) == 16


def test_best_k_agrees_with_the_policy_rule():
    for a in (0.2, 0.5, 0.7, 0.9):
        for c in (0.05, 0.2):
            assert best_k(a, c, 1.0, k_max=12) == best_draft_length(a, c, 1.0, 12)


def test_best_k_prefers_shorter_drafts_when_verification_grows():
    flat = best_k(0.9, 0.05, 1.0, k_max=12)
    steep = best_k(0.9, 0.05, {t: 1.0 + 0.2 * (t - 1) for t in range(1, 14)}, k_max=12)
    assert steep < flat


@pytest.mark.parametrize("a,k", [(0.0, 3), (0.35, 2), (0.8, 5), (0.99, 4)])
def test_acceptance_from_mean_tokens_inverts_expected_tokens(a, k):
    assert acceptance_from_mean_tokens(expected_tokens(a, k), k) == pytest.approx(a, abs=1e-9)


def test_acceptance_from_mean_tokens_rejects_impossible_means():
    with pytest.raises(DsparkError, match="mean tokens"):
        acceptance_from_mean_tokens(5.5, 4)
    with pytest.raises(DsparkError, match="mean tokens"):
        acceptance_from_mean_tokens(0.5, 4)


def test_acceptance_from_counts():
    assert acceptance_from_counts(3, 1) == 0.75
    assert acceptance_from_counts(0, 0) == 0.0
    with pytest.raises(DsparkError):
        acceptance_from_counts(-1, 2)


def test_interpolate_cost():
    costs = {1: 1.0, 2: 1.2, 4: 2.0}
    assert interpolate_cost(costs, 2) == pytest.approx(1.2)
    assert interpolate_cost(costs, 3) == pytest.approx(1.6)
    assert interpolate_cost(costs, 6) == pytest.approx(2.8)  # extrapolated along the last segment
    assert interpolate_cost({1: 1.5}, 7) == 1.5
    with pytest.raises(DsparkError):
        interpolate_cost({}, 1)


def test_cost_helpers():
    assert cost_ratio(0.5e-3, 2e-3) == 0.25
    assert relative_costs({1: 2.0, 3: 3.0}) == {1: 1.0, 3: 1.5}
    assert median_seconds([3.0, 1.0, 100.0]) == 3.0
    assert fraction_of(1.7, 2.0) == pytest.approx(0.85)
    assert fraction_of(None, 2.0) is None and fraction_of(1.0, 0.0) is None
    with pytest.raises(DsparkError):
        cost_ratio(1.0, 0.0)
    with pytest.raises(DsparkError):
        relative_costs({2: 1.0})
    with pytest.raises(DsparkError):
        speedup_bound(1.5, 2, 0.1)


def test_reexports_are_the_policy_functions():
    from dspark.decode import policy

    assert analysis.expected_tokens is policy.expected_tokens
    assert analysis.analytical_speedup is policy.analytical_speedup
