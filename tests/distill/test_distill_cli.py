"""`dspark distill` end to end on the built-in family with tiny budgets: collect -> train -> measure
-> HF checkpoint folder + candidate YAML + JSON summary; a re-run does not retrain; every bad input
fails with one line (exit 2) before anything is collected or written."""

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dspark.cli import app
from dspark.distill.distill import parse_optional_value_flags
from dspark.errors import DsparkError
from tests.distill.train_helpers import DRAFT, HELDOUT, TARGET, collect_small_cache

runner = CliRunner()
TINY = ["--steps", "4", "--batch-size", "4", "--heldout-percent", str(HELDOUT), "--eval-prompts", "3",
        "--eval-max-new-tokens", "12", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def cache():
    """The shared small cache (collected once per test process)."""
    return collect_small_cache()


def run(*args):
    return runner.invoke(app, ["distill", *map(str, args)])


def error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    text = " ".join(result.output.split())
    assert "error:" in text and "Traceback" not in text
    return text


def test_collect_train_measure_write_and_rerun(tmp_path):
    out = tmp_path / "run"
    res = run("--target", TARGET, "--draft", DRAFT, "--task", "code", "--out", out, "--num-prompts", 10,
              "--max-new-tokens", 12, "--top-k", 16, "--objective", "jsd:0.3", "--acceptance-head", "--json", *TINY)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["objective"] == "jsd:0.3" and (out / "cache" / "manifest.json").is_file()
    (d,) = summary["drafts"]
    folder, cand = Path(d["path"]), Path(d["candidate"])
    assert folder == out / "drafts" / DRAFT and cand == out / "candidates" / f"{DRAFT}.yaml"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "acceptance_head.json",
              "acceptance_head.safetensors", "dspark_distill.json"):
        assert (folder / f).is_file(), f
    assert not list(folder.glob("*.bin")) and not (out / "checkpoints" / DRAFT).exists()
    m = d["metrics"]
    for when in ("before", "after"):
        assert 0 < m[f"heldout_{when}"]["expected_acceptance"] <= 1
        assert m[f"decoder_{when}"]["mean_accepted_tokens"] >= 1.0 and m[f"decoder_{when}"]["k"] == 4
    spec = yaml.safe_load(cand.read_text())
    assert {"name", "target", "draft", "quantization", "draft_length", "provenance", "measured"} <= set(spec)
    assert spec["target"] == TARGET and spec["quantization"] == "none" and spec["draft_length"] == "learned"
    from dspark.config.candidate import load_candidate, resolve_relative

    parsed = load_candidate(cand)  # the strict schema `dspark select` reads
    assert Path(resolve_relative(parsed.draft, cand)) == folder.resolve()
    prov = spec["provenance"]
    assert prov["objective"] == "jsd:0.3" and prov["steps"] == 4 and prov["target"] == TARGET
    assert prov["source_draft"] == DRAFT and prov["method"] == "distill-full"
    from dspark.distill.cache import manifest_hash

    assert prov["cache_manifest_sha256"] == manifest_hash(out / "cache") == summary["cache_manifest_sha256"]
    meas = spec["measured"]
    assert meas["mean_accepted_tokens_before"] == m["decoder_before"]["mean_accepted_tokens"]
    assert meas["mean_accepted_tokens"] == m["decoder_after"]["mean_accepted_tokens"]
    assert meas["expected_acceptance"] == m["heldout_after"]["expected_acceptance"]
    # the exported folder is a plain HF checkpoint the decoder loads, acceptance head included
    from dspark.decode.engine import SpeculativeDecoder
    from dspark.models import load_model

    t, dr = load_model(TARGET), load_model(str(folder))
    assert SpeculativeDecoder(t.model, dr.model, t.tokenizer, draft_length="learned").acceptance_head is not None
    # same command again: nothing is retrained, the same summary comes back
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = run("--target", TARGET, "--draft", DRAFT, "--task", "code", "--out", out, "--num-prompts", 10,
                "--max-new-tokens", 12, "--top-k", 16, "--objective", "jsd:0.3", "--acceptance-head", "--json", *TINY)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout[again.stdout.index("{"):])["drafts"] == summary["drafts"]
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # ... but other settings in the same folder are refused, not silently mixed
    other = run("--target", TARGET, "--draft", DRAFT, "--task", "code", "--out", out, "--num-prompts", 10,
                "--max-new-tokens", 12, "--top-k", 16, "--objective", "tvd", *TINY)
    assert "other settings" in error_line(other)


def test_given_cache_lora_and_several_drafts(tmp_path, cache):
    out = tmp_path / "run"
    second = tmp_path / "copy-of-s"
    import shutil

    from dspark.models.registry import builtin_path

    shutil.copytree(builtin_path(DRAFT), second)
    res = run("--target", TARGET, "--draft", DRAFT, "--draft", second, "--cache", cache, "--out", out, "--lora", "--json",
              *TINY)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["task"] == "code"  # taken from the cache's manifest
    names = [d["name"] for d in summary["drafts"]]
    assert names == [DRAFT, "copy-of-s"] and not (out / "cache").exists()
    for d in summary["drafts"]:
        assert d["provenance"]["lora_rank"] == 16
        cfg = json.loads((Path(d["path"]) / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"]
        assert not (Path(d["path"]) / "adapter_config.json").exists()  # merged, not an adapter


def test_headline_70b_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    res = run("--target", "llama3-70b", "--task", "code", "--draft", "llama3.2-1b", "--out", out)
    text = error_line(res)
    assert "not available" in text and "llama3-70b" in text
    assert not out.exists()


def test_cache_from_another_target_is_refused(tmp_path, cache):
    out = tmp_path / "run"
    text = error_line(run("--target", "tiny-code", "--draft", DRAFT, "--cache", cache, "--out", out, *TINY))
    assert "was made by target" in text and str(cache) in text
    assert not (out / "drafts").exists()


def test_truncated_cache_part_is_named(tmp_path, cache):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    part = sorted((broken / "data").glob("*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:-50])
    text = error_line(run("--target", TARGET, "--draft", DRAFT, "--cache", broken, "--out", tmp_path / "r", *TINY))
    assert part.name in text and "truncated" in text


def test_empty_task_data_fails_without_writing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    text = error_line(run("--target", TARGET, "--draft", DRAFT, "--data", empty, "--out", out, *TINY))
    assert "empty" in text or "no prompts" in text
    assert not (out / "drafts").exists()


@pytest.mark.parametrize("extra, match", [
    (["--objective", "kl"], "unknown objective"),
    (["--objective", "jsd:2"], "beta"),
    (["--epochs", "1"], "not both"),
    (["--lora", "abc"], "--lora RANK"),
    (["--on-policy", "1.5"], "--on-policy LAMBDA"),
    (["--bogus"], "unexpected argument '--bogus'"),
    (["--eval-k", "0"], "K >= 1"),
])
def test_bad_options_fail_before_work(tmp_path, extra, match):
    out = tmp_path / "run"
    text = error_line(run("--target", TARGET, "--draft", DRAFT, "--task", "code", "--out", out, *TINY, *extra))
    assert match in text and not out.exists()


def test_deepspeed_without_deepspeed_names_the_train_extra(tmp_path, monkeypatch):
    from dspark.distill import parallel

    monkeypatch.setattr(parallel, "deepspeed_installed", lambda: False)  # whether or not it is installed here
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    out = tmp_path / "run"
    text = error_line(run("--target", TARGET, "--draft", DRAFT, "--task", "code", "--out", out, "--deepspeed", cfg,
                          *TINY))
    assert "deepspeed" in text and "`train` extra" in text and not out.exists()


def test_duplicate_drafts_and_missing_source(tmp_path):
    assert "twice" in error_line(run("--target", TARGET, "--draft", DRAFT, "--draft", DRAFT, "--task", "code",
                                     "--out", tmp_path / "a", *TINY))
    assert "give a task" in error_line(run("--target", TARGET, "--draft", DRAFT, "--out", tmp_path / "b", *TINY))


def test_out_that_is_a_file_fails_at_once(tmp_path, monkeypatch):
    """It was a traceback after collecting and measuring for a minute."""
    from dspark.distill import collect as collect_mod

    def must_not_load(*_a, **_k):
        raise AssertionError("loaded the target before checking --out")

    monkeypatch.setattr(collect_mod, "load_target", must_not_load)
    f = tmp_path / "run.txt"
    f.write_text("keep")
    text = error_line(run("--target", TARGET, "--draft", DRAFT, "--task", "code", "--out", f, *TINY))
    assert f"--out {str(f)!r} is a file" in text and f.read_text() == "keep"


def test_ctrl_c_says_the_run_can_be_resumed(tmp_path, monkeypatch):
    """Ctrl-C printed click's bare "Aborted!" (or a traceback): now one line naming what is kept."""
    from dspark.distill import distill as distill_mod

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_mod, "run_distill", interrupted)
    out = tmp_path / "run"
    res = run("--target", TARGET, "--draft", DRAFT, "--task", "code", "--out", out, *TINY)
    assert res.exit_code == 130, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "run the same command again to resume" in lines[0] and str(out) in lines[0]


def test_optional_value_flags():
    assert parse_optional_value_flags([]) == (None, None)
    assert parse_optional_value_flags(["--lora"]) == (16, None)
    assert parse_optional_value_flags(["--lora", "8", "--on-policy"]) == (8, 0.5)
    assert parse_optional_value_flags(["--on-policy=0.25", "--lora=4"]) == (4, 0.25)
    with pytest.raises(DsparkError, match="unexpected argument 'x'"):
        parse_optional_value_flags(["x"])


def test_recipe_body_matches_its_command():
    """The recipe's header is the exact command; its keys are that command's options, parsed by
    the real CLI parser (a renamed option or a drifted value fails here)."""
    import shlex

    import typer.main

    from dspark.distill.distill import __file__ as distill_file

    recipe = Path(distill_file).parents[1] / "recipes" / "distill-tiny-code.yaml"
    text = recipe.read_text()
    words = shlex.split(text.splitlines()[0].lstrip("# "))
    assert words[:2] == ["dspark", "distill"]
    cmd = typer.main.get_command(app).commands["distill"]
    params = cmd.make_context("distill", list(words[2:])).params
    body = yaml.safe_load(text)
    for key, value in body.items():
        got = params[key]
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got == value or str(got) == str(value), (key, got, value)  # Path vs str, 10.0 vs 10
    given = {w[2:].replace("-", "_") for w in words if w.startswith("--")}
    assert given == set(body)
