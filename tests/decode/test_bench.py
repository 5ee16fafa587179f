"""`dspark bench` on a tiny setup: every method present, greedy outputs identical, the identity check
able to fail, the JSON/table contract, and one-line errors. Behaviour only: no timing asserted."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dspark.cli import app
from dspark.decode import bench as bench_mod
from dspark.decode.bench import (BenchConfig, bench_prefix, measure_forward_seconds, parse_int_list, render_table,
                                 run_bench, summary_lines)
from dspark.errors import DsparkError
from dspark.memory import MB, status_bytes
from dspark.quantize.loading import model_bytes

from .conftest import requested_device
from .decode_models import STORIES, noised_copy

runner = CliRunner()
METHODS = {"target-only", "hf-assisted", "dspark-target-only", "dspark-k1", "dspark-k2", "dspark-auto"}


@pytest.fixture(scope="module")
def stories_pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES))
    target = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    device = requested_device()
    return target.to(device), noised_copy(target, std=0.01, seed=1).to(device), tok


@pytest.fixture(scope="module")
def stories_draft_dir(tmp_path_factory, stories_pair):
    target, draft, tok = stories_pair
    folder = tmp_path_factory.mktemp("bench-draft")
    draft.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_bench_json_tiny(tmp_path, stories_pair, stories_draft_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\nThe little dog\nTom had a red ball.\n")
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["bench", "--target", str(STORIES), "--draft", str(stories_draft_dir),
                                 "--prompts", str(prompts), "--n", "2", "--max-new-tokens", "6", "--ks", "1,2",
                                 "--batch-sizes", "1,2", "--cost-reps", "2", "--threads", "1",
                                 "--device", requested_device(), "--dtype", "float32", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert json.loads(out.read_text()) == report
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == METHODS
    assert report["greedy_outputs_identical"] is True and report["mismatches"] == []
    assert report["n_prompts"] == 2 and report["max_new_tokens"] == 6
    for r in rows.values():
        assert r["outputs_identical"] is True
        assert r["generated_tokens"] == 2 * 6  # eos disabled for every method: fixed length
        assert r["tokens_per_s"] > 0
    assert rows["target-only"]["speedup"] == 1.0 and rows["hf-assisted"]["ratio_to_hf_assisted"] == 1.0
    assert rows["dspark-target-only"]["mean_accepted_tokens"] == 1.0
    for k in (1, 2):
        r = rows[f"dspark-k{k}"]
        assert 1.0 <= r["mean_accepted_tokens"] <= k + 1
        assert 0 < r["mean_draft_length"] <= k
        own = r["tokens_per_s"] / rows["dspark-target-only"]["tokens_per_s"]  # the bound's baseline
        assert r["speedup_vs_dspark_target_only"] == pytest.approx(own)
        assert r["analytical_bound"] > 0 and r["fraction_of_bound"] == pytest.approx(own / r["analytical_bound"])
    assert report["cost_ratio"] > 0 and report["verify_costs"]["1"] == 1.0
    assert [b["batch_size"] for b in report["batched"]] == [1, 2]
    assert all(b["outputs_identical"] for b in report["batched"])
    assert report["threads"] == 1
    mem = report["memory"]  # this process's own readings over the command, not an estimate (the
    # kernel's RSS counters are synced lazily: a later reading may differ by a few pages)
    assert 0 < mem["baseline_rss_mb"] <= mem["peak_rss_mb"] <= status_bytes("VmHWM") / MB + 1
    target, draft, _ = stories_pair
    assert mem["weights_mb"] == pytest.approx((model_bytes(target) + model_bytes(draft)) / MB)
    assert mem["peak_growth_over_weights"] == pytest.approx(
        (mem["peak_rss_mb"] - mem["baseline_rss_mb"]) / mem["weights_mb"])
    assert "peak RSS" in _render(report)


def test_identity_check_catches_a_differing_method(monkeypatch, stories_pair):
    target, draft, tok = stories_pair
    real = bench_mod.hf_generate

    def broken_assisted(model, prompt, max_new_tokens, stop_ids, pad_id, assistant=None):
        out = real(model, prompt, max_new_tokens, stop_ids, pad_id, assistant)
        return out[:-1] + [(out[-1] + 1) % 512] if assistant is not None else out

    monkeypatch.setattr(bench_mod, "hf_generate", broken_assisted)
    prompts = [tok("Once upon a time")["input_ids"], tok("The little dog")["input_ids"]]
    report = run_bench(target, draft, tok, prompts, BenchConfig(max_new_tokens=5, ks=(2,), batch_sizes=(2,),
                                                                cost_reps=1, threads=1))
    assert report["greedy_outputs_identical"] is False
    assert {(m["method"], m["prompt"], m["first_difference"]) for m in report["mismatches"]} == {
        ("hf-assisted", 0, 4), ("hf-assisted", 1, 4)}
    rows = {r["method"]: r for r in report["results"]}
    assert rows["hf-assisted"]["outputs_identical"] is False and rows["dspark-auto"]["outputs_identical"] is True
    console_text = _render(report)
    assert "NO" in console_text and "hf-assisted differ" in console_text


def test_stop_at_eos_uses_the_same_ids(stories_pair):
    target, draft, tok = stories_pair
    prompts = [tok("Once upon a time")["input_ids"]]
    report = run_bench(target, draft, tok, prompts, BenchConfig(max_new_tokens=4, ks=(1,), batch_sizes=(1,),
                                                                stop_at_eos=True, cost_reps=1, threads=1))
    assert report["stop_token_ids"] == [2]
    assert report["greedy_outputs_identical"] is True


def _render(report) -> str:
    from rich.console import Console

    console = Console(record=True, width=160)
    for t in render_table(report):
        console.print(t)
    for line in summary_lines(report):
        console.print(line)
    return console.export_text()


def test_table_lists_every_method(stories_pair):
    target, draft, tok = stories_pair
    report = run_bench(target, draft, tok, [tok("Lily")["input_ids"]],
                       BenchConfig(max_new_tokens=3, ks=(1, 3), batch_sizes=(1,), cost_reps=1, threads=1))
    text = _render(report)
    for m in ("target-only", "hf-assisted", "dspark-target-only", "dspark-k1", "dspark-k3", "dspark-auto"):
        assert m in text
    assert "greedy outputs identical across all methods: yes" in text
    assert "cost ratio c" in text


def test_forward_costs_and_prefix(stories_pair):
    target, _, _ = stories_pair
    secs = measure_forward_seconds(target, list(range(3, 40)), [1, 3], reps=2, warmup=1)
    assert set(secs) == {1, 3} and all(s > 0 for s in secs.values())
    prefix = bench_prefix([[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=10, context=512)
    assert len(prefix) == 5 + 5
    assert len(bench_prefix([[1] * 600], max_new_tokens=10, context=512)) == 512 - 64


def test_bench_prompts_from_task(stories_pair):
    _, _, tok = stories_pair
    texts, source = bench_mod.bench_prompts(tok, None, "code", 2)
    assert len(texts) == 2 and all(t.strip() for t in texts) and source == "task code (eval split)"


def test_parse_int_list():
    assert parse_int_list("1, 2,4,2", "--ks") == (1, 2, 4)
    for bad, needle in (("", "comma-separated"), ("1,x", "'x' is not an integer"), ("0,1", ">= 1, got 0")):
        with pytest.raises(DsparkError, match=needle):
            parse_int_list(bad, "--ks")


def test_bench_config_validation():
    with pytest.raises(DsparkError, match="max_new_tokens"):
        BenchConfig(max_new_tokens=0)
    with pytest.raises(DsparkError, match="threads"):
        BenchConfig(threads=0)


@pytest.mark.parametrize("extra,needle", [
    (["--ks", "0,2"], "--ks: every value must be >= 1, got 0"),
    (["--ks", "two"], "--ks: 'two' is not an integer"),
    (["--batch-sizes", "0"], "--batch-sizes: every value must be >= 1, got 0"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--task", "code"], "give exactly one of --prompts FILE or --task NAME"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
])
def test_bench_bad_input_is_one_line(tmp_path, extra, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    result = runner.invoke(app, ["bench", "--target", str(STORIES), "--draft", str(STORIES),
                                 "--prompts", str(prompts), *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_bench_unknown_task_is_one_line():
    result = runner.invoke(app, ["bench", "--target", str(STORIES), "--draft", str(STORIES), "--task", "poetry",
                                 "--device", "cpu"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown task 'poetry'" in lines[0] and "code" in lines[0]
