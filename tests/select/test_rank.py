"""Ranking is a pure function of the measured numbers."""

from __future__ import annotations

import pytest

from dspark.errors import DsparkError
from dspark.select.rank import rank_candidates


def row(name, speedup=None, mem=None, tput=None, status="ok", **kw):
    return {"name": name, "status": status, "speedup": speedup, "peak_memory_mb": mem, "batched_tokens_per_s": tput,
            **kw}


ROWS = [row("a", 1.5, 300, 900), row("b", 2.0, 500, 800), row("c", 1.2, 100, 1200),
        row("d", status="failed", reason="could not load"), row("e", status="unsupported", reason="tokenizer")]


def names(r):
    return [x["name"] for x in r.rows]


def test_speedup_objective():
    r = rank_candidates(ROWS, "speedup")
    assert r.winner == "b" and names(r)[:3] == ["b", "a", "c"] and r.metric == "speedup"
    assert [x["rank"] for x in r.rows] == [1, 2, 3, None, None]


def test_throughput_objective():
    r = rank_candidates(ROWS, "throughput")
    assert r.winner == "c" and names(r)[:3] == ["c", "a", "b"] and r.metric == "batched_tokens_per_s"


def test_memory_objective_prefers_drafts_that_help():
    rows = ROWS + [row("slow-tiny", 0.8, 10, 100)]
    r = rank_candidates(rows, "memory")
    assert r.winner == "c" and names(r)[:4] == ["c", "a", "b", "slow-tiny"]


def test_failed_and_unsupported_are_kept_with_their_reasons():
    r = rank_candidates(ROWS, "speedup")
    tail = {x["name"]: x for x in r.rows[3:]}
    assert tail["d"]["status"] == "failed" and tail["d"]["reason"] == "could not load"
    assert tail["e"]["status"] == "unsupported" and len(r.rows) == len(ROWS)
    assert names(r)[3:] == ["e", "d"]  # unsupported before failed


def test_max_memory_excludes_but_reports():
    r = rank_candidates(ROWS, "speedup", max_memory_mb=400)
    assert r.winner == "a"
    b = next(x for x in r.rows if x["name"] == "b")
    assert b["status"] == "excluded" and "over --max-memory" in b["reason"] and b["rank"] is None


def test_ties_within_tolerance_are_reported_and_broken_deterministically():
    rows = [row("x", 1.50, 200), row("y", 1.51, 100), row("z", 1.20, 50)]
    r = rank_candidates(rows, "speedup", tie_tolerance=0.02)
    assert r.winner == "y" and r.ties == ["x"]
    assert r.rows[0]["tied_with"] == ["x"] and r.rows[1]["tied_with"] == ["y"] and r.rows[2]["tied_with"] == []
    exact = rank_candidates([row("p", 1.5, 200), row("q", 1.5, 100)], "speedup", tie_tolerance=0.0)
    assert exact.winner == "q" and exact.ties == ["p"]  # equal speedup: less memory wins
    assert rank_candidates(rows, "speedup", tie_tolerance=0.001).ties == []


def test_projection_ranks_by_projected_speedup():
    rows = [row("a", 1.5, projected_speedup=2.5), row("b", 2.0, projected_speedup=1.8)]
    r = rank_candidates(rows, "speedup", projected=True)
    assert r.winner == "a" and r.metric == "projected_speedup"


def test_missing_metric_fails_the_row_and_no_winner_without_ok_rows():
    r = rank_candidates([row("a", None)], "speedup")
    assert r.winner is None and r.rows[0]["status"] == "failed" and "no speedup was measured" in r.rows[0]["reason"]
    assert rank_candidates([], "speedup").winner is None


def test_bad_objective_and_inputs_are_untouched():
    with pytest.raises(DsparkError, match=r"unknown objective 'latency' \(valid: speedup, throughput, memory\)"):
        rank_candidates(ROWS, "latency")
    before = [dict(x) for x in ROWS]
    rank_candidates(ROWS, "speedup", max_memory_mb=1)
    assert ROWS == before
