"""`dspark generate`: greedy output with a draft == without == HF generate, prompts files, grammar
output, and one-line errors (exit 2, no traceback) for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dspark.cli import app
from dspark.decode.bench import hf_generate
from dspark.decode.run import read_prompts_file, resolve_draft_name
from dspark.errors import DataError, DsparkError

from .conftest import requested_device
from .decode_models import BUILTIN, STORIES, noised_copy

runner = CliRunner()
BASE = ["--device", requested_device(), "--dtype", "float32"]


@pytest.fixture(scope="module")
def stories_draft(tmp_path_factory):
    """A draft for stories260K: a noised copy saved as a model folder (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("stories-draft")
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    noised_copy(model, std=0.01, seed=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(STORIES)).save_pretrained(folder)
    return folder


def builtin_pair() -> tuple[str, str]:
    """The built-in pair; until the target `tiny-code` is trained, the medium draft stands in for it."""
    target = "tiny-code" if (BUILTIN / "tiny-code").is_dir() else "tiny-code-draft-m"
    return target, "tiny-code-draft-s"


def run_json(args: list[str]) -> list[dict]:
    result = runner.invoke(app, ["generate", *args, *BASE, "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def hf_reference(model_name: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    from dspark.decode.engine import SpeculativeDecoder
    from dspark.models import load_model

    m = load_model(model_name, device=requested_device(), dtype="float32")
    stops = list(SpeculativeDecoder(m.model, None, m.tokenizer).default_stop_ids)
    return [hf_generate(m.model, m.tokenizer(p)["input_ids"], max_new_tokens, stops, stops[0]) for p in prompts]


def check_rows(rows: list[dict], prompts: list[str]) -> None:
    assert [r["prompt"] for r in rows] == prompts
    for r in rows:
        assert set(r) >= {"prompt", "text", "token_ids", "stats"}
        assert set(r["stats"]) == {"target_forwards", "drafted", "accepted", "acceptance_rate",
                                   "mean_accepted_tokens", "tokens_per_s", "mode"}


def test_stories_greedy_with_draft_equals_no_draft_equals_hf(tmp_path, stories_draft):
    prompts = ["Once upon a time", "The little dog", "Lily went to the park and"]
    f = tmp_path / "p.txt"
    f.write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    common = ["--target", str(STORIES), "--prompts", str(f), "--max-new-tokens", "24"]
    spec = run_json([*common, "--draft", str(stories_draft), "--draft-length", "3"])
    auto_b2 = run_json([*common, "--draft", str(stories_draft), "--batch-size", "2"])
    alone = run_json([*common, "--no-draft"])
    check_rows(spec, prompts)
    want = hf_reference(str(STORIES), prompts, 24)
    assert [r["token_ids"] for r in spec] == want
    assert [r["token_ids"] for r in auto_b2] == want
    assert [r["token_ids"] for r in alone] == want
    for r in alone:
        assert r["stats"]["drafted"] == 0 and r["stats"]["mean_accepted_tokens"] == 1.0
    assert sum(r["stats"]["drafted"] for r in spec) > 0
    # a noised copy agrees with the target often: fewer target forwards than tokens
    assert sum(r["stats"]["target_forwards"] for r in spec) < sum(r["stats"]["target_forwards"] for r in alone)


def test_builtin_pair_greedy_matches_hf(tmp_path):
    target, draft = builtin_pair()
    prompts = ["def fibonacci(n):\n    ", "import os\nimport sys\n\n"]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    rows = run_json(["--target", target, "--draft", draft, "--prompts", str(f), "--max-new-tokens", "20"])
    check_rows(rows, prompts)
    assert [r["token_ids"] for r in rows] == hf_reference(target, prompts, 20)
    text = rows[0]["text"]
    assert isinstance(text, str) and text


def test_plain_output_has_text_and_stats_line(stories_draft):
    result = runner.invoke(app, ["generate", "--target", str(STORIES), "--draft", str(stories_draft),
                                 "--prompt", "Once upon a time", "--max-new-tokens", "8", *BASE],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Once upon a time" in result.stdout
    assert "tok/s" in result.stdout and "mean accepted tokens" in result.stdout


def test_json_schema_output_parses(tmp_path):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "ok": {"type": "boolean"}},
              "required": ["color", "ok"], "additionalProperties": False}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    rows = run_json(["--target", str(STORIES), "--no-draft", "--prompt", "Once upon a time",
                     "--max-new-tokens", "64", "--json-schema", str(f)])
    obj = json.loads(rows[0]["text"])
    assert set(obj) == {"color", "ok"} and obj["color"] in {"red", "green", "blue"} and isinstance(obj["ok"], bool)


def test_regex_constrains_output(stories_draft):
    rows = run_json(["--target", str(STORIES), "--draft", str(stories_draft), "--prompt", "The cat",
                     "--max-new-tokens", "16", "--regex", "(yes|no)"])
    assert rows[0]["text"] in {"yes", "no"}


# -- prompts files ------------------------------------------------------------------------------------------

def test_read_txt_and_jsonl(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("first\n\n  \nsecond line\n")
    assert read_prompts_file(t) == ["first", "second line"]
    j = tmp_path / "a.jsonl"
    j.write_text('{"prompt": "def f():\\n    "}\n\n{"prompt": "x", "other": 1}\n')
    assert read_prompts_file(j) == ["def f():\n    ", "x"]


@pytest.mark.parametrize("name,content,match", [
    ("a.jsonl", "not json\n", "line 1: not JSON"),
    ("a.jsonl", '{"text": "x"}\n', "line 1: needs an object with a 'prompt' field"),
    ("a.jsonl", '{"prompt": "ok"}\n{"prompt": ""}\n', "line 2: 'prompt' must be a non-empty string"),
    ("a.jsonl", '["prompt"]\n', "needs an object"),
    ("a.txt", "\n\n", "has no prompts"),
    ("a.csv", "x\n", "must end in .txt"),
])
def test_bad_prompts_files(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        read_prompts_file(f)


def test_missing_prompts_file(tmp_path):
    with pytest.raises(DataError, match="cannot read prompts file"):
        read_prompts_file(tmp_path / "nope.txt")


def test_draft_defaults():
    assert resolve_draft_name("tiny-code", None, False) == "tiny-code-draft-s"
    assert resolve_draft_name("tiny-code", "x", False) == "x"
    assert resolve_draft_name("anything", None, True) is None
    with pytest.raises(DsparkError, match="no default draft"):
        resolve_draft_name("some/model", None, False)


# -- bad input: one line, exit 2, no traceback ----------------------------------------------------------------

def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, ["generate", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


S = ["--target", str(STORIES)]


@pytest.mark.parametrize("args,needle", [
    ([*S, "--no-draft", "--prompt", "x", "--temperature", "-0.5"], "temperature must be >= 0, got -0.5"),
    ([*S, "--no-draft", "--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    ([*S, "--no-draft", "--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    ([*S, "--no-draft", "--prompt", "x", "--top-k", "-1"], "top_k must be >= 0"),
    ([*S, "--no-draft", "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    ([*S, "--no-draft", "--prompt", "x", "--draft-length", "0"], "draft length K must be >= 1, got 0"),
    ([*S, "--no-draft", "--prompt", "x", "--draft-length", "fast"], "unknown draft length 'fast'"),
    ([*S, "--no-draft", "--prompt", "x", "--batch-size", "0"], "batch size must be >= 1, got 0"),
    ([*S, "--no-draft", "--prompt", ""], "prompt 0 is empty"),
    ([*S, "--no-draft", "--prompt", "   "], "prompt 0 is empty"),
    ([*S, "--no-draft"], "give exactly one of --prompt TEXT or --prompts FILE"),
    ([*S, "--no-draft", "--prompt", "x", "--json-schema", "/nonexistent/schema.json"],
     "cannot read JSON schema file '/nonexistent/schema.json'"),
    ([*S, "--no-draft", "--prompt", "x", "--regex", "(unclosed"], "invalid regex"),
    ([*S, "--no-draft", "--prompt", "x", "--regex", "a", "--grammar", "g.ebnf"], "give at most one of"),
    ([*S, "--draft", str(STORIES), "--no-draft", "--prompt", "x"], "not both"),
    (["--target", "some/unknown-model", "--prompt", "x"], "has no default draft"),
    ([*S, "--no-draft", "--prompt", "x", "--device", "tpu"], "unknown device 'tpu'"),
    ([*S, "--no-draft", "--prompt", "x", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    # a seed torch refuses was a traceback after loading the models
    ([*S, "--no-draft", "--prompt", "x", "--temperature", "0.5", "--seed", "100000000000000000000000"],
     "seed must be an integer in [0, 2**63), got 100000000000000000000000"),
    ([*S, "--no-draft", "--prompt", "x", "--temperature", "0.5", "--seed", "-1"], "seed must be an integer in"),
])
def test_bad_input_is_one_line(args, needle):
    assert needle in one_line_error(args)


def test_unreadable_schema_content(tmp_path):
    f = tmp_path / "s.json"
    f.write_text("{not json")
    assert "invalid JSON schema file" in one_line_error([*S, "--no-draft", "--prompt", "x", "--json-schema", str(f)])


def test_too_long_prompt_names_the_length():
    line = one_line_error([*S, "--no-draft", "--prompt", "Once upon a time " * 200, *BASE])
    assert "prompt 0 has" in line and "context is 512 tokens" in line


def test_draft_with_another_tokenizer_is_decoded_cross_tokenizer():
    rows = run_json([*S, "--draft", "tiny-code-draft-s", "--prompt", "x", "--max-new-tokens", "4"])
    assert rows[0]["stats"]["mode"] == "cross-tokenizer"


def test_prompts_file_error_via_cli(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": 1}\n')
    assert "line 1: needs an object with a 'prompt' field" in one_line_error([*S, "--no-draft", "--prompts", str(f)])


def test_a_constraint_nothing_can_match_is_refused_and_a_dead_end_is_named():
    """`--regex '[^\\s\\S]'` exited 0 with no output; a dead end mid-way was reported as "stop"."""
    line = one_line_error([*S, "--no-draft", "--prompt", "Once", "--regex", r"[^\s\S]", *BASE])
    assert "can never be satisfied" in line
    result = runner.invoke(app, ["generate", *S, "--no-draft", "--prompt", "Once", "--regex", r"a[^\s\S]", *BASE,
                                 "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["text"] == "a" and row["finish_reason"] == "dead_end"
    assert "warning: prompt 0: the constraint allowed no further token" in result.stderr
