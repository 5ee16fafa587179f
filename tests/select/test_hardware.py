"""Projection onto other hardware (Leviathan's model) and its inputs."""

from __future__ import annotations

import pytest

from dspark.decode.analysis import expected_tokens
from dspark.errors import DsparkError
from dspark.select import hardware as H


def test_project_matches_leviathan_and_picks_the_best_k():
    a, c = 0.8, 0.05
    s, k = H.project(a, c)
    assert s == pytest.approx(max(expected_tokens(a, kk) / (kk * c + 1) for kk in range(1, 17)))
    assert s == pytest.approx(expected_tokens(a, k) / (k * c + 1))
    # a cheaper draft never projects slower, and drafts more
    s2, k2 = H.project(a, 0.01)
    assert s2 > s and k2 >= k
    assert H.project(0.0, 0.1) == (pytest.approx(1 / 1.1), 1)


def test_parse_cost_ratios():
    assert H.parse_cost_ratios("0.05", ["a", "b"]) == {"a": 0.05, "b": 0.05}
    assert H.parse_cost_ratios("a=0.1, b=0.2", ["a", "b"]) == {"a": 0.1, "b": 0.2}
    for text, msg in [("x", "not a number"), ("0", "must be > 0"), ("a=0.1", "no value for b"),
                      ("c=0.1,a=1,b=1", "unknown candidate 'c'"), ("a=0.1,b", "is not NAME=F"), ("", "empty")]:
        with pytest.raises(DsparkError, match=msg):
            H.parse_cost_ratios(text, ["a", "b"])


def test_roofline_cost_ratio():
    hw = H.get_hardware("H100")
    big = H.roofline_cost_ratio(2e9, 16, 140e9, 80, hw)
    assert 0.01 < big < 0.05
    # int8 weights (half the bytes) lower c on a memory-bound machine; launch overhead bounds it below
    assert H.roofline_cost_ratio(1e9, 16, 140e9, 80, hw) < big
    assert H.roofline_cost_ratio(1, 16, 140e9, 80, hw) > 0
    with pytest.raises(DsparkError, match=r"unknown hardware 'tpu' \(valid: h200, h100"):
        H.get_hardware("tpu")
