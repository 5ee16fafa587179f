"""`dspark quickstart --fast`: the whole pipeline on the built-in family, run once through the CLI
(offline), then every artifact checked. Plus the stage-error contract and the reuse bookkeeping,
which need no models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dspark.cli import app
from dspark.errors import DsparkError
from tests.common import offline_env

REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "dspark" / "models" / "builtin"
FAMILY = ("tiny-code", "tiny-code-draft-s", "tiny-code-draft-m")


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    for name in FAMILY:
        if not (BUILTIN / name).is_dir():
            pytest.skip(f"built-in model {name} is not built")
    out = tmp_path_factory.mktemp("quickstart") / "run"
    with offline_env():
        result = CliRunner().invoke(app, ["quickstart", "--fast", "--out", str(out), "--device", "cpu", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    return out, summary


def test_every_stage_leaves_its_artifact(quickstart_run):
    out, summary = quickstart_run
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] > 0
    for draft in ("tiny-code-draft-s", "tiny-code-draft-m"):
        cand = yaml.safe_load((out / "distill" / "candidates" / f"{draft}.yaml").read_text())
        assert cand["name"] == draft and cand["target"] == "tiny-code"
        assert (out / "distill" / "drafts" / draft / "model.safetensors").is_file()
    quant = summary["stages"]["quantize"]
    assert "skipped" in quant or Path(quant["candidate"]).is_file()
    report = json.loads((out / "select" / "report.json").read_text())
    names = {r["name"] for r in report["candidates"]}
    assert {"tiny-code-draft-s-base", "tiny-code-draft-m-base", "tiny-code-draft-s", "tiny-code-draft-m"} <= names
    assert report["winner"] in names and report["winner"] == summary["winner"]
    assert (out / "select" / "selected.yaml").is_file()
    bundle = yaml.safe_load((out / "bundle" / "dspark-bundle.yaml").read_text())
    assert bundle["name"] == report["winner"]
    assert (out / "quickstart.json").is_file()


def test_the_request_got_a_completion_with_speculative_stats(quickstart_run):
    _, summary = quickstart_run
    req = summary["request"]
    assert isinstance(req["text"], str) and req["text"].strip()
    assert req["usage"]["completion_tokens"] >= 1
    assert req["speculative"]["verify_steps"] >= 1
    assert summary["stages"]["serve"]["url"].startswith("http://127.0.0.1:")


def test_summary_table_lists_every_candidate(quickstart_run):
    from dspark.quickstart import QuickstartResult, render_summary

    out, summary = quickstart_run
    res = QuickstartResult(out=out, report=json.loads((out / "select" / "report.json").read_text()))
    table, lines = render_summary(res)
    assert table.row_count == len(summary["candidates"])
    assert lines[0] == f"winner: {summary['winner']}"


def test_a_failing_stage_is_one_line_naming_it(monkeypatch, tmp_path):
    import dspark.distill.collect as collect
    import dspark.quickstart as qs

    monkeypatch.setattr(qs, "_check_models", lambda: None)

    def broken(*_a, **_k):
        raise DsparkError("task 'code' has no train prompts")

    monkeypatch.setattr(collect, "run_collect", broken)
    result = CliRunner().invoke(app, ["quickstart", "--fast", "--out", str(tmp_path / "q")])
    assert result.exit_code == 2
    assert "quickstart stage 'collect' failed: task 'code' has no train prompts" in result.output
    assert "Traceback" not in result.output


def test_a_library_exception_is_named_too():
    from dspark.quickstart import stage_errors

    with pytest.raises(DsparkError, match=r"^quickstart stage 'serve' failed: ConnectionError: refused$"):
        with stage_errors("serve"):
            raise ConnectionError("refused\nmore detail")


def test_reuse_needs_the_same_inputs_and_the_outputs(tmp_path):
    from dspark.quickstart import fingerprint, mark_done, reusable

    made = tmp_path / "report.json"
    key = fingerprint({"candidates": ["a.yaml", "b.yaml"], "n": 10})
    assert not reusable(tmp_path, "select", key, made)
    made.write_text("{}")
    mark_done(tmp_path, "select", key)
    assert reusable(tmp_path, "select", key, made)
    assert not reusable(tmp_path, "select", fingerprint({"candidates": ["a.yaml"], "n": 10}), made)
    made.unlink()
    assert not reusable(tmp_path, "select", key, made)


def test_a_folder_of_another_budget_is_refused_before_any_work(monkeypatch, tmp_path):
    import dspark.quickstart as qs

    monkeypatch.setattr(qs, "_check_models", lambda: None)
    out = tmp_path / "q"
    qs.mark_done(out, "budget", qs.fingerprint({"made": "with other budgets"}))
    result = CliRunner().invoke(app, ["quickstart", "--fast", "--out", str(out)])
    assert result.exit_code == 2
    assert "quickstart stage 'setup' failed" in result.output and "pass another --out" in result.output
    assert not (out / "cache").exists()
