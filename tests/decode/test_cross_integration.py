"""Cross-tokenizer pairs through the stages that build decoders: `dspark generate`, `dspark bench`
(run_bench), and the decode session a server's scheduler drives. Tiny settings: behaviour, not timing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dspark.cli import app
from dspark.decode import CrossTokenizerDecoder, GenerationConfig, make_decoder
from dspark.decode.bench import BenchConfig, render_table, run_bench, summary_lines

from .conftest import requested_device
from .decode_models import STORIES, TINY_DRAFT, hf_greedy, load_hf, single_thread  # noqa: F401

runner = CliRunner()
BASE = ["--device", requested_device(), "--dtype", "float32"]

pytestmark = pytest.mark.skipif(not (STORIES.is_dir() and TINY_DRAFT.is_dir()),
                                reason="needs ../shared/models/stories260K and tiny-code-draft-s")


def run_json(args: list[str]) -> list[dict]:
    result = runner.invoke(app, ["generate", *args, *BASE, "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_generate_cli_with_a_draft_of_another_tokenizer(tmp_path):
    prompts = ["Once upon a time", "Lily saw a café  über"]
    f = tmp_path / "p.txt"
    f.write_text("\n".join(prompts) + "\n")
    common = ["--target", str(STORIES), "--prompts", str(f), "--max-new-tokens", "20"]
    cross = run_json([*common, "--draft", "tiny-code-draft-s", "--draft-length", "3"])
    alone = run_json([*common, "--no-draft"])
    assert [r["token_ids"] for r in cross] == [r["token_ids"] for r in alone]
    assert [r["text"] for r in cross] == [r["text"] for r in alone]
    assert all(r["stats"]["mode"] == "cross-tokenizer" for r in cross)
    assert all(r["stats"]["mode"] == "same-tokenizer" for r in alone)
    assert sum(r["stats"]["drafted"] for r in cross) > 0
    tok, target = load_hf(STORIES)
    assert [r["token_ids"] for r in cross] == [hf_greedy(target, tok(p).input_ids, 20, [2]) for p in prompts]


def test_generate_cli_cross_with_json_schema(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"enum": ["cat", "dog"]}},
                                  "required": ["a"], "additionalProperties": False}))
    common = ["--target", str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", "40",
              "--json-schema", str(schema)]
    cross = run_json([*common, "--draft", "tiny-code-draft-s"])
    alone = run_json([*common, "--no-draft"])
    assert cross[0]["token_ids"] == alone[0]["token_ids"]
    if cross[0]["finish_reason"] == "stop":
        assert json.loads(cross[0]["text"])["a"] in ("cat", "dog")


def test_run_bench_on_a_cross_pair():
    tok, target = load_hf(STORIES)
    dtok, draft = load_hf(TINY_DRAFT)
    prompts = [tok(p).input_ids for p in ("Once upon a time", "The little dog")]
    cfg = BenchConfig(max_new_tokens=8, ks=(1, 2), batch_sizes=(2,), cost_reps=1, threads=1)
    report = run_bench(target, draft, tok, prompts, cfg, draft_tokenizer=dtok)
    assert report["mode"] == "cross-tokenizer" and report["tokenizer_compat"]["mode"] == "different"
    assert report["greedy_outputs_identical"], report["mismatches"]
    rows = {r["method"]: r for r in report["results"]}
    assert {"target-only", "dspark-target-only", "dspark-k1", "dspark-k2", "dspark-auto"} <= set(rows)
    assert rows["dspark-k2"]["mean_accepted_tokens"] >= 1.0 and rows["dspark-k2"]["mean_draft_length"] > 0
    # HF universal assisted generation is the peer when HF accepts the pair; otherwise a note says why not
    assert "hf-assisted" in rows or any("hf-assisted left out" in n for n in report["notes"])
    assert report["batched"][0]["outputs_identical"]
    table, _ = render_table(report)
    assert "cross-tokenizer" in table.title
    assert any("identical" in line for line in summary_lines(report))


def test_session_interface_for_continuous_batching():
    """The scheduler's calls: session(), add() between step()s, cancel(), live stats on events."""
    tok, target = load_hf(STORIES)
    dtok, draft = load_hf(TINY_DRAFT)
    dec = make_decoder(target, draft, tok, "3", draft_tokenizer=dtok)
    assert isinstance(dec, CrossTokenizerDecoder)
    prompts = [tok(p).input_ids for p in ("Once upon a time", "The little dog", "One day, a big")]
    cfg = GenerationConfig(max_new_tokens=16, stop_token_ids=(1, 2))
    refs = [hf_greedy(target, p, 16, [1, 2]) for p in prompts]
    s = dec.session()
    assert s.accepts(GenerationConfig(temperature=0.7, seed=3))
    s.add([prompts[0]], [cfg], row_ids=["a"])
    got: dict = {"a": [], "b": [], "c": []}
    done = {}
    first = s.step()
    s.add([prompts[1], prompts[2]], [cfg, cfg], row_ids=["b", "c"])  # join a running session
    events = first
    cancelled = False
    while True:
        for ev in events:
            got[ev.row].extend(ev.token_ids)
            if getattr(ev, "stats", None) is not None:
                assert ev.stats.mode == "cross-tokenizer"
            if ev.result is not None:
                done[ev.row] = ev.result
        if not cancelled and "c" not in done and got["c"]:
            assert s.cancel("c") and not s.cancel("c")
            cancelled = True
        if not s.active:
            break
        events = s.step()
    assert done["a"].token_ids == refs[0] and done["b"].token_ids == refs[1]
    assert "c" not in done and got["c"] == refs[2][: len(got["c"])]
