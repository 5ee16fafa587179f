"""Speculative-decoding arithmetic for benchmarks and reports (pure functions, no models, no clocks).

Leviathan et al. (2023) model one verify step as K drafted tokens, each accepted independently with
probability a, stopping at the first rejection; the target then adds one token (recovered or bonus):

    E(a, K)  = (1 - a^(K+1)) / (1 - a)          expected tokens per target forward (bonus included)
    S(a, K)  = E(a, K) / (K * c + v)            speedup over target-only decoding

with c = draft forward cost / target decode-step cost and v = cost of the verify forward over K + 1
tokens / target decode-step cost (1 in the paper; measured here, since a K + 1 token forward is not
free on a CPU). S is the *bound*: the speed the step arithmetic allows when nothing else (sampling,
masks, bookkeeping) costs time, so measured speedup / S says how much of it the loop achieves.

`expected_tokens`, `analytical_speedup` and `best_draft_length` live in `dspark.decode.policy` (the
goodput policy uses them per step); they are re-exported here so there is one implementation.
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

from dspark.decode.policy import analytical_speedup, best_draft_length, expected_tokens
from dspark.errors import DsparkError

__all__ = [
    "acceptance_from_counts", "acceptance_from_mean_tokens", "analytical_speedup", "best_draft_length",
    "best_k", "cost_ratio", "expected_tokens", "fraction_of", "interpolate_cost", "median_seconds",
    "relative_costs", "speedup_bound",
]


def _check_rate(a: float, what: str = "acceptance rate") -> float:
    a = float(a)
    if math.isnan(a) or not 0.0 <= a <= 1.0:
        raise DsparkError(f"{what} must be in [0, 1], got {a}")
    return a


def acceptance_from_counts(accepted: int, rejections: int) -> float:
    """Per-token acceptance a under Leviathan's model: every draft judged up to and including the
    first rejection of a step is a Bernoulli trial (later drafts were never judged), so the maximum
    likelihood estimate is accepted / (accepted + rejections). In DecodeStats terms the rejections
    are the recovered tokens. 0.0 when nothing was judged."""
    if accepted < 0 or rejections < 0:
        raise DsparkError(f"counts must be >= 0, got accepted={accepted}, rejections={rejections}")
    trials = accepted + rejections
    return accepted / trials if trials else 0.0


def acceptance_from_mean_tokens(mean_tokens: float, k: float, tol: float = 1e-12) -> float:
    """The a for which E(a, k) equals a measured mean of tokens per verify step (the inverse of
    `expected_tokens` in a; E is increasing in a from 1 at a = 0 to k + 1 at a = 1)."""
    if k <= 0:
        raise DsparkError(f"draft length must be > 0, got {k}")
    if not 1.0 <= mean_tokens <= k + 1:
        raise DsparkError(f"mean tokens per step must be in [1, {k + 1}] for K = {k}, got {mean_tokens}")
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if expected_tokens(mid, k) < mean_tokens:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def interpolate_cost(costs: Mapping[int, float], tokens: float) -> float:
    """A forward's relative cost for `tokens` input tokens from costs measured at integer token
    counts: linear between the nearest measured counts, linear extrapolation beyond them.

    costs: {token count: cost}, at least one entry."""
    if not costs:
        raise DsparkError("no measured forward costs to interpolate")
    xs = sorted(costs)
    if len(xs) == 1:
        return float(costs[xs[0]])
    if tokens <= xs[0]:
        x0, x1 = xs[0], xs[1]
    elif tokens >= xs[-1]:
        x0, x1 = xs[-2], xs[-1]
    else:
        x1 = next(x for x in xs if x >= tokens)
        x0 = max(x for x in xs if x <= tokens)
        if x0 == x1:
            return float(costs[x0])
    y0, y1 = costs[x0], costs[x1]
    return float(y0 + (y1 - y0) * (tokens - x0) / (x1 - x0))


def speedup_bound(a: float, k: float, c: float, verify_costs: Mapping[int, float] | float = 1.0) -> float:
    """S(a, k) = E(a, k) / (k * c + v(k + 1)) where v(k + 1) is the relative cost of a target forward
    over k + 1 tokens (a constant, or measured costs keyed by token count, see `interpolate_cost`).
    k may be fractional (a mean draft length). k = 0 is target-only decoding: 1 / v(1)."""
    a = _check_rate(a)
    if k < 0 or c < 0:
        raise DsparkError(f"draft length and cost ratio must be >= 0, got k={k}, c={c}")
    v = float(verify_costs) if isinstance(verify_costs, (int, float)) else interpolate_cost(verify_costs, k + 1)
    if v <= 0:
        raise DsparkError(f"verify cost must be > 0, got {v}")
    return expected_tokens(a, k) / (k * c + v)


def best_k(a: float, c: float, verify_costs: Mapping[int, float] | float = 1.0, k_max: int = 16) -> int:
    """The static draft length in 1..k_max with the highest `speedup_bound` (smallest K on ties).
    With a constant verify cost this equals `best_draft_length(a, c, v, k_max)`."""
    _check_rate(a)
    if k_max < 1:
        raise DsparkError(f"k_max must be >= 1, got {k_max}")
    best, best_s = 1, -1.0
    for k in range(1, k_max + 1):
        s = speedup_bound(a, k, c, verify_costs)
        if s > best_s * (1 + 1e-12):
            best, best_s = k, s
    return best


def median_seconds(samples: Sequence[float]) -> float:
    """A forward's time from repeated measurements: the median, which ignores the odd slow sample a
    busy machine produces."""
    if not samples:
        raise DsparkError("no timing samples")
    return float(statistics.median(samples))


def cost_ratio(draft_step_s: float, target_step_s: float) -> float:
    """c = seconds per draft forward / seconds per target decode step (one new token each)."""
    if target_step_s <= 0 or draft_step_s < 0:
        raise DsparkError(f"forward times must be positive, got draft {draft_step_s}, target {target_step_s}")
    return draft_step_s / target_step_s


def relative_costs(seconds_by_tokens: Mapping[int, float]) -> dict[int, float]:
    """Target forward times by input token count, divided by the 1-token time: {T: v(T)}, v(1) = 1."""
    if 1 not in seconds_by_tokens or seconds_by_tokens[1] <= 0:
        raise DsparkError("relative forward costs need a positive 1-token forward time")
    base = seconds_by_tokens[1]
    return {int(t): s / base for t, s in sorted(seconds_by_tokens.items())}


def fraction_of(measured: float | None, bound: float | None) -> float | None:
    """measured / bound, or None when either is missing or the bound is not positive."""
    if measured is None or bound is None or bound <= 0:
        return None
    return measured / bound
