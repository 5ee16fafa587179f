"""`dspark select` end to end on the built-in family: three candidates (two base drafts and an int8
one made here), plus one with another tokenizer and one that cannot load, scored in one run; every
report file is written and selected.yaml is what `dspark export --selection` parses."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dspark.cli import app

from tests.select.conftest import STORIES, TARGET, have, need_builtins

runner = CliRunner()
FAST = ["--n", "2", "--max-new-tokens", "6", "--ks", "1,2", "--cost-reps", "2", "--threads", "1",
        "--batch-size", "2"]
REQUIRED = ("acceptance_rate", "mean_accepted_tokens", "draft_cost_ratio", "tokens_per_s", "speedup",
            "best_draft_length", "peak_memory_mb", "acceptance_per_position", "auto_speedup", "draft_length")


@pytest.fixture(scope="module")
def int8_candidate(tmp_path_factory):
    need_builtins(TARGET, "tiny-code-draft-s", "tiny-code-draft-m")
    if not have("optimum.quanto") and not have("torchao"):
        pytest.skip("no int8 backend (optimum-quanto or torchao) is installed")
    from dspark.quantize.run import CANDIDATE_FILE, QuantizeOptions, quantize_draft

    out = tmp_path_factory.mktemp("q") / "s-int8"
    quantize_draft(out, QuantizeOptions(method="int8", guard=False), draft="tiny-code-draft-s")
    return out / CANDIDATE_FILE


def test_select_three_candidates_writes_every_report_file(tmp_path, int8_candidate):
    cands = tmp_path / "cands"
    cands.mkdir()
    (cands / "small.yaml").write_text(f"name: small\ntarget: {TARGET}\ndraft: tiny-code-draft-s\n"
                                      "draft_length: learned\n")
    (cands / "gone.yaml").write_text("name: gone\ndraft: ./no-such-checkpoint\n")
    args = ["select", "--candidates", str(cands / "*.yaml"), "--candidates", "tiny-code-draft-m",
            "--candidates", str(int8_candidate), "--target", TARGET, "--task", "code", "--out", str(tmp_path / "r"),
            *FAST]
    if STORIES.is_dir():
        args += ["--candidates", str(STORIES)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "r"
    for f in ("report.json", "report.md", "report.png", "selected.yaml"):
        assert (out / f).is_file(), f
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["candidates"]}
    ok = ["small", "tiny-code-draft-m", "tiny-code-draft-s-int8"]
    assert all(rows[n]["status"] == "ok" for n in ok), {n: rows[n].get("reason") for n in ok}
    for n in ok:
        r = rows[n]
        assert all(r[k] is not None for k in REQUIRED), {k: r[k] for k in REQUIRED}
        assert r["outputs_identical"] is True  # greedy: every method reproduced the target's own output
        assert set(r["methods"]) == {"auto", "k1", "k2"}
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / r["baseline_tokens_per_s"])
        assert r["best_draft_length"] in (1, 2) and len(r["acceptance_per_position"]) <= 2
        assert r["tokens_per_s"] == max(m["tokens_per_s"] for m in r["methods"].values())
        assert 1.0 <= r["mean_accepted_tokens"] <= 3.0 and 0.0 <= r["acceptance_rate"] <= 1.0
        assert r["draft_cost_ratio"] > 0 and r["peak_memory_mb"] >= 0
    assert rows["tiny-code-draft-s-int8"]["quantization"] == "int8"
    # its own policy needs an acceptance head it does not have: reported, the rest still measured
    assert any("'learned' not measured" in n for n in rows["small"]["notes"])
    assert rows["gone"]["status"] == "failed" and "no-such-checkpoint" in rows["gone"]["reason"]
    if STORIES.is_dir():
        # another tokenizer: scored through cross-tokenizer decoding, greedy still the target's own output
        st = rows["stories260K"]
        assert st["status"] == "ok", st.get("reason")
        assert st["tokenizer"] == "different" and st["decoder_mode"] == "cross-tokenizer"
        assert st["outputs_identical"] is True and st["draft_cost_ratio"] > 0
        assert all(rows[n]["decoder_mode"] == "same-tokenizer" for n in ok)
    ranked = [r for r in report["candidates"] if r["rank"] is not None]
    assert len(ranked) == 3 + STORIES.is_dir()
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1)) and report["winner"] == ranked[0]["name"]
    assert ranked[0]["speedup"] >= ranked[1]["speedup"] >= ranked[2]["speedup"]
    assert report["baseline_tokens_per_s"] > 0 and report["n_prompts"] == 2 and report["projection"] is None

    from dspark.bundle.manifest import load_selection

    sel = load_selection(out / "selected.yaml")  # the schema `dspark export --selection` parses
    w = rows[report["winner"]]
    assert sel.name == w["name"] and sel.target == TARGET and sel.draft_length == w["draft_length"]
    assert sel.metrics.speedup == pytest.approx(w["speedup"]) and sel.metrics.projected is False
    assert sel.metrics.best_draft_length == w["best_draft_length"] and sel.metrics.prompts == 2
    md = (out / "report.md").read_text()
    assert "**Winner: " in md and "gone: failed" in md
    assert "winner: " in result.stdout and "tiny-code-draft-m" in result.stdout


def test_projection_and_selection_spec_are_labelled(tmp_path):
    from dspark.select.measure import SelectConfig
    from dspark.select.rank import rank_candidates
    from dspark.select.report import selection_spec
    from dspark.select.run import _projection

    rows = [{"name": "a", "status": "ok", "acceptance_per_token": 0.8, "speedup": 1.1, "draft_deployed_bytes": 2e6,
             "draft_layers": 2, "draft": "tiny-code-draft-s", "draft_length": "2", "quantization": "none"},
            {"name": "b", "status": "ok", "acceptance_per_token": 0.6, "speedup": 1.3, "draft_deployed_bytes": 1e6,
             "draft_layers": 2, "draft": "tiny-code-draft-m", "draft_length": "auto", "quantization": "none"}]
    info = _projection(SelectConfig(hardware="h100"), rows, target_bytes=1e10, target_layers=32)
    assert info["hardware"] == "h100" and "H100" in info["label"]
    assert all(r["projected_speedup"] > 1 and r["projected_best_draft_length"] >= 1 for r in rows)
    ranking = rank_candidates(rows, "speedup", projected=True)
    assert ranking.winner == "a"  # higher acceptance wins once drafting is cheap, though b measured faster here
    report = {"target": TARGET, "projection": info, "ranked_by": ranking.metric, "tie_tolerance": 0.02,
              "task": "code", "n_prompts": 2, "max_new_tokens": 6, "temperature": 0.0, "objective": "speedup",
              "device": "cpu", "measured_at": None}
    spec = selection_spec(report, ranking.rows[0], None)
    assert spec.metrics.projected is True and spec.metrics.hardware == info["label"]
    assert spec.metrics.speedup == ranking.rows[0]["projected_speedup"] and spec.metrics.tokens_per_s is None
    assert spec.draft_length == "auto"
    assert spec.metrics.best_draft_length == ranking.rows[0]["projected_best_draft_length"]
    per = _projection(SelectConfig(cost_ratio="a=0.5,b=0.01"), rows, 1e10, 32)
    assert per["method"] == "given cost ratio" and rows[0]["projected_cost_ratio"] == 0.5


@pytest.mark.parametrize("extra,msg", [
    (["--objective", "latency", "--task", "code"], "unknown objective 'latency'"),
    (["--task", "code", "--prompts", "p.txt"], "give exactly one of --task NAME or --prompts FILE"),
    (["--task", "no-such-task"], "no-such-task"),
    (["--task", "code", "--cost-ratio", "x=0.1"], "--cost-ratio names unknown candidate 'x'"),
    (["--task", "code", "--hardware", "tpu"], "unknown hardware 'tpu'"),
    (["--task", "code", "--cost-ratio", "0.1", "--hardware", "h100"], "not both"),
    (["--task", "code", "--ks", "0"], "--ks"),
])
def test_bad_input_fails_before_loading(tmp_path, extra, msg):
    need_builtins("tiny-code-draft-s")
    result = runner.invoke(app, ["select", "--candidates", "tiny-code-draft-s", "--target", TARGET, *extra,
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert msg in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_glob_that_matches_nothing(tmp_path):
    result = runner.invoke(app, ["select", "--candidates", str(tmp_path / "*.yaml"), "--target", TARGET,
                                 "--task", "code"])
    assert result.exit_code == 2 and "matched no candidate files" in result.stderr
