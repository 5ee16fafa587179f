"""`dspark train-head` end to end on the built-in family with tiny budgets: a head folder in
speculators' format, vllm.json, the curve, a comparison with a separate draft; a re-run does not
retrain; bad input fails with one line (exit 2) before work."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dspark.cli import app
from tests.distill.train_helpers import DRAFT, HELDOUT, TARGET, collect_small_cache

runner = CliRunner()


@pytest.fixture(scope="module")
def cache():
    return collect_small_cache()


def run(*args):
    return runner.invoke(app, ["train-head", *map(str, args)])


def test_train_write_and_rerun(tmp_path, cache):
    from dspark.models.eagle3 import load_head

    out = tmp_path / "run"
    args = ["--target", TARGET, "--cache", cache, "--out", out, "--steps", 3, "--batch-size", 4, "--draft-vocab", 512,
            "--vocab-prompts", 40, "--heldout-percent", HELDOUT, "--compare-draft", DRAFT, "--device", "cpu",
            "--dtype", "float32", "--json"]
    res = run(*args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    head_dir = out / "heads" / "eagle3"
    assert summary["head"] == str(head_dir) and summary["steps"] == 3 and summary["features"] == "online"
    assert summary["vocabulary"]["draft_vocab_size"] == 512 and 0 < summary["vocabulary"]["heldout_coverage"] <= 1
    head = load_head(head_dir)
    assert head.config.draft_vocab_size == 512 and head.config.speculative_tokens == 3
    vllm = json.loads((out / "vllm.json").read_text())
    assert vllm["speculative_config"] == {"method": "eagle3", "model": "./heads/eagle3", "num_speculative_tokens": 3}
    assert (out / "curve.png").stat().st_size > 0 and not (out / "checkpoints" / "eagle3").exists()
    cmp = summary["compare"][DRAFT]
    assert len(cmp["expected_acceptance"]) == 3 and cmp["anchors"] == summary["after"]["anchors"]
    again = run(*args)
    assert again.exit_code == 0 and "already trained" in again.stderr
    other = run(*[a if a != 40 else 20 for a in args])  # another vocabulary: not the same run
    assert other.exit_code == 2 and "trained with other settings" in other.output


def test_offline_run_collects_the_hidden_states_first(tmp_path, cache):
    out = tmp_path / "off"
    res = run("--target", TARGET, "--cache", cache, "--out", out, "--steps", 2, "--batch-size", 4, "--offline",
              "--heldout-percent", HELDOUT, "--device", "cpu", "--dtype", "float32", "--json")
    assert res.exit_code == 0, res.output
    assert "storage estimate" in res.stderr
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["features"] == "offline" and (out / "hidden" / "manifest.json").is_file()
    # the target is not needed once the hidden states are collected
    res = run("--target", "not-a-model", "--cache", cache, "--out", tmp_path / "off2", "--steps", 2, "--batch-size", 4,
              "--hidden-cache", out / "hidden", "--heldout-percent", HELDOUT, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("extra, match", [
    (["--ttt-steps", "0"], "--ttt-steps must be >= 1"),
    (["--layers", "1,2"], "--layers must be 3"),
    (["--layers", "0,1,7"], "head layers must be 3 distinct ids in \\[0, 2\\]"),
    (["--draft-vocab", "100000"], "larger than the target's vocabulary"),
    (["--hidden-dtype", "int8"], "--hidden-dtype"),
    (["--offline", "--loss-on-prompt"], "--loss-on-prompt needs"),
])
def test_bad_input_is_one_line(tmp_path, cache, extra, match):
    import re

    res = run("--target", TARGET, "--cache", cache, "--out", tmp_path / "x", "--steps", 1, "--device", "cpu", *extra)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "error:" in text and "Traceback" not in text and re.search(match, text), text


@pytest.mark.slow
def test_two_gloo_processes_train_one_head(tmp_path, cache):
    """`torchrun --nproc_per_node 2 -m dspark train-head`: both ranks train on disjoint rows and must
    end with the same weights (compared at the end); rank 0 saves exactly those."""
    import os
    import subprocess
    import sys

    from dspark.distill.train import weights_digest
    from dspark.models.eagle3 import load_head

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dspark",
           "train-head", "--target", TARGET, "--cache", str(cache), "--out", str(tmp_path / "run"), "--epochs", "1",
           "--batch-size", "2", "--heldout-percent", str(HELDOUT), "--device", "cpu", "--dtype", "float32", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["world_size"] == 2
    head = load_head(summary["head"])
    assert weights_digest(head.trainable()) == summary["weights_sha256"]
    assert summary["after"]["expected_acceptance"][0] > summary["before"]["expected_acceptance"][0]
