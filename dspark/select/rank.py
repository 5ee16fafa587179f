"""Ranking scored candidates (a pure function of their measured numbers).

Objectives:
- `speedup`: highest speedup over target-only decoding (the projected speedup when a projection is
  requested: the user asked which draft wins on the other machine);
- `throughput`: highest tokens/s when all prompts are decoded together (batched);
- `memory`: least peak memory among the candidates that beat target-only decoding (speedup > 1),
  then the others, each group by memory.
Ties: candidates whose objective value is within `tie_tolerance` (relative) of the winner's are
reported as tied with it; the order among tied candidates falls back to speedup, then peak memory,
then name. Only candidates with status "ok" are ranked; "failed", "unsupported" and "excluded"
(over --max-memory) ones stay in the list, after the ranked ones, with their reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from dspark.errors import DsparkError

OBJECTIVES: dict[str, tuple[str, bool]] = {
    # objective: (row field, higher is better)
    "speedup": ("speedup", True),
    "throughput": ("batched_tokens_per_s", True),
    "memory": ("peak_memory_mb", False),
}
STATUS_ORDER = ("ok", "excluded", "unsupported", "failed")
DEFAULT_TIE_TOLERANCE = 0.02


@dataclass
class Ranking:
    rows: list[dict[str, Any]]
    winner: str | None
    ties: list[str] = field(default_factory=list)
    metric: str = ""


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise DsparkError(f"unknown objective {objective!r} (valid: {', '.join(OBJECTIVES)})")
    return objective


def objective_field(objective: str, projected: bool = False) -> str:
    field_, _ = OBJECTIVES[check_objective(objective)]
    return "projected_speedup" if projected and objective == "speedup" else field_


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def rank_candidates(rows: Sequence[dict[str, Any]], objective: str = "speedup", max_memory_mb: float | None = None,
                    tie_tolerance: float = DEFAULT_TIE_TOLERANCE, projected: bool = False) -> Ranking:
    """Order `rows` (dicts with at least name, status and the objective's field) and pick the
    winner. Returns new dicts with `rank` (1.. for ranked rows, None otherwise) and `tied_with`;
    rows over `max_memory_mb` become status "excluded" with a reason. Never drops a row."""
    metric = objective_field(objective, projected)
    higher = OBJECTIVES[objective][1]
    if tie_tolerance < 0:
        raise DsparkError(f"tie tolerance must be >= 0, got {tie_tolerance}")
    out = [dict(r, rank=None, tied_with=[]) for r in rows]
    for r in out:
        if r.get("status") != "ok":
            continue
        mem = _num(r.get("peak_memory_mb"))
        if max_memory_mb is not None and mem is not None and mem > max_memory_mb:
            r["status"] = "excluded"
            r["reason"] = f"peak memory {mem:.1f} MB is over --max-memory ({max_memory_mb:.1f} MB)"
        elif _num(r.get(metric)) is None:
            r["status"] = "failed"
            r["reason"] = r.get("reason") or f"no {metric} was measured"

    def key(r):
        v = _num(r[metric])
        speed = _num(r.get("speedup")) or 0.0
        mem = _num(r.get("peak_memory_mb"))
        mem = math.inf if mem is None else mem
        if objective == "memory":
            return (speed <= 1.0, v, -speed, r["name"])
        return (-v if higher else v, -speed, mem, r["name"])

    ok = sorted((r for r in out if r["status"] == "ok"), key=key)
    rest = sorted((r for r in out if r["status"] != "ok"),
                  key=lambda r: (STATUS_ORDER.index(r["status"]) if r["status"] in STATUS_ORDER else len(STATUS_ORDER),
                                 r["name"]))
    for i, r in enumerate(ok, 1):
        r["rank"] = i
    winner = ok[0]["name"] if ok else None
    ties: list[str] = []
    if ok:
        best = _num(ok[0][metric])
        beats = lambda r: (_num(r.get("speedup")) or 0.0) > 1.0  # noqa: E731
        # under `memory`, a candidate slower than the target alone never ties with one that is faster
        group = [r for r in ok[1:] if objective != "memory" or beats(r) == beats(ok[0])]
        for r in group:
            v = _num(r[metric])
            scale = max(abs(best), abs(v), 1e-12)
            if abs(v - best) <= tie_tolerance * scale:
                ties.append(r["name"])
        if ties:
            ok[0]["tied_with"] = list(ties)
            for r in ok[1:]:
                if r["name"] in ties:
                    r["tied_with"] = [winner] + [t for t in ties if t != r["name"]]
    return Ranking(rows=ok + rest, winner=winner, ties=ties, metric=metric)
