"""A candidate's peak_memory_mb is a real measurement of what scoring it adds: the draft, KV caches
and activations, not another copy of the already loaded target (each candidate's decoder used to
build a transposed copy of the target's weights: ~35 MB for a 2 MB draft beside a 21 MB target)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dspark.cli import app
from dspark.memory import reset_peak, status_bytes

from tests.select.conftest import TARGET, need_builtins


@pytest.mark.slow  # one `dspark select` run: ~7 s of CPU
@pytest.mark.skipif(status_bytes("VmRSS") is None or not reset_peak(),
                    reason="needs Linux /proc/self/status and /proc/self/clear_refs")
def test_peak_memory_counts_the_candidate_not_a_copy_of_the_target(tmp_path):
    need_builtins(TARGET, "tiny-code-draft-s")
    result = CliRunner().invoke(app, ["select", "--candidates", "tiny-code-draft-s", "--target", TARGET, "--task",
                                      "code", "--out", str(tmp_path / "r"), "--n", "2", "--max-new-tokens", "6",
                                      "--ks", "1", "--cost-reps", "1", "--threads", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "r" / "report.json").read_text())["candidates"][0]
    assert row["status"] == "ok" and row["memory_method"] == "peak RSS (VmHWM) delta"
    target_mb = 20.9  # tiny-code's float32 weights
    assert row["draft_memory_mb"] <= row["peak_memory_mb"] < target_mb
