"""User data: every local format, folders, field aliases, chat templates, splits, malformed input."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dspark.errors import DataError, DsparkError
from dspark.tasks import PROMPT_FIELDS, DataSource, PromptRecord, load_data, resolve_prompts, split_of
from dspark.tasks.records import content_key

SHARED = Path(__file__).resolve().parents[3] / "shared"
STORIES = SHARED / "models" / "stories260K"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# --- fields and aliases -------------------------------------------------------------------------

ROWS = [
    {"prompt": "def add(a, b):\n", "id": 7},
    {"text": "Once upon a time"},
    {"question": "What is 2 + 2?", "answer": "4"},
    {"instruction": "Translate to French.", "input": "Good morning"},
    {"instruction": "Name a colour.", "input": ""},
    {"turns": ["First question?", "Follow-up?"]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"},
                  {"role": "assistant", "content": "Fine."}]},
    {"messages": [{"role": "user", "content": "m"}], "prompt": "messages win over prompt"},
]


def check_alias_records(recs):
    assert len(recs) == len(ROWS)
    p, t, q, ins, ins_empty, turns, chat, both = recs
    assert p.prompt == "def add(a, b):\n" and p.messages is None and p.meta["id"] == 7
    assert t.prompt == "Once upon a time"
    assert q.messages == ({"role": "user", "content": "What is 2 + 2?"},) and q.prompt is None
    assert ins.messages[0]["content"] == "Translate to French.\n\nGood morning"
    assert ins_empty.messages[0]["content"] == "Name a colour."
    assert turns.messages == ({"role": "user", "content": "First question?"},)
    # the trailing assistant turn is the reply the target writes: dropped; earlier turns kept
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user"]
    assert both.messages == ({"role": "user", "content": "m"},) and both.prompt is None
    assert [r.meta["field"] for r in recs] == ["prompt", "text", "question", "instruction", "instruction",
                                               "turns", "messages", "messages"]


def test_documented_fields_are_exactly_these():
    assert PROMPT_FIELDS == ("messages", "prompt", "text", "question", "instruction", "turns")


def test_jsonl_aliases(tmp_path):
    f = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(2, "   ")  # blank lines are skipped, but line numbers keep counting
    write_jsonl(f, lines)
    recs = load_data(f)
    check_alias_records(recs)
    assert [r.id for r in recs][:4] == ["data.jsonl:1", "data.jsonl:2", "data.jsonl:4", "data.jsonl:5"]
    assert all(r.source == "data:data.jsonl" for r in recs)


def test_json_list(tmp_path):
    f = tmp_path / "data.json"
    f.write_text(json.dumps(ROWS), encoding="utf-8")
    recs = load_data(str(f))
    check_alias_records(recs)
    assert recs[0].id == "data.json:1"


def test_parquet_with_nested_messages_and_nulls(tmp_path):
    f = tmp_path / "data.parquet"
    # one table for all rows: absent fields become nulls, which count as absent
    keys = list(dict.fromkeys(k for r in ROWS for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in ROWS]), f)
    recs = load_data(f)
    check_alias_records(recs)
    assert recs[2].id == "data.parquet:3"


def test_parquet_written_by_datasets(tmp_path):
    import datasets

    f = tmp_path / "ds.parquet"
    datasets.Dataset.from_dict({"question": ["a?", "b?", "c?"], "answer": ["1", "2", "3"]}).to_parquet(str(f))
    assert [r.messages[0]["content"] for r in load_data(f)] == ["a?", "b?", "c?"]


def test_txt_lines(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\n  \nsecond prompt  \r\nthird", encoding="utf-8")
    recs = load_data(f)
    assert [r.prompt for r in recs] == ["first prompt", "second prompt  ", "third"]
    assert [r.id for r in recs] == ["prompts.txt:1", "prompts.txt:4", "prompts.txt:5"]


def test_gzip_jsonl_and_txt(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt": "zipped"}) + "\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("zipped line\n")
    assert load_data(tmp_path / "a.jsonl.gz")[0].prompt == "zipped"
    assert load_data(tmp_path / "b.txt.gz")[0].prompt == "zipped line"
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz is not a valid gzip file") as e:
        load_data(tmp_path / "bad.jsonl.gz")
    one_line_error(e)


def test_folder_recursive_sorted_hidden_and_other_files_ignored(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    write_jsonl(d / "b.jsonl", [{"prompt": "from b"}])
    (d / "a.txt").write_text("from a\n", encoding="utf-8")
    (d / "sub" / "c.json").write_text(json.dumps([{"question": "from c"}]), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"text": "from d"}]), d / "sub" / "d.parquet")
    (d / "README.md").write_text("# not data\n", encoding="utf-8")
    (d / ".secret.jsonl").write_text("not json\n", encoding="utf-8")
    (d / ".hidden" / "x.jsonl").write_text("not json\n", encoding="utf-8")
    src = DataSource(d)
    assert src.kind == "folder" and len(src.files) == 4
    recs = src.prompts(None)
    assert [r.id for r in recs] == ["a.txt:1", "b.jsonl:1", "sub/c.json:1", "sub/d.parquet:1"]
    assert [r.render() for r in recs] == ["from a", "from b", "user: from c\nassistant:", "from d"]
    assert src.describe_source().startswith("folder:") and "(4 files)" in src.describe_source()


def test_folder_errors_name_the_member_file(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", [{"prompt": "ok"}])
    write_jsonl(d / "sub" / "b.jsonl", [{"prompt": "ok"}, "{oops"])
    with pytest.raises(DataError) as e:
        load_data(d)
    assert one_line_error(e) == f"{d / 'sub' / 'b.jsonl'} line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"


def test_folder_without_data_files(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "notes.md").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(d)
    assert one_line_error(e) == f"folder {d} has no .jsonl/.json/.parquet/.txt files"


# --- chat templates -----------------------------------------------------------------------------

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizers():
    if not STORIES.exists():
        pytest.skip(f"real tokenizer missing: {STORIES}")
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(STORIES)
    templated = copy.deepcopy(plain)
    templated.chat_template = TEMPLATE
    return plain, templated


def test_chat_template_applied_when_tokenizer_has_one(tmp_path, tokenizers):
    plain, templated = tokenizers
    assert not plain.chat_template
    f = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
        {"question": "What is 2 + 2?"},
        {"prompt": "raw completion text"},
    ])
    chat, question, raw = load_data(f)
    assert chat.render(templated) == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    assert question.render(templated) == "<|user|>What is 2 + 2?\n<|assistant|>"
    # completion-style records are never wrapped in a template
    assert raw.render(templated) == "raw completion text"
    # no template: a plain transcript that ends where the model should answer
    assert chat.render(plain) == "system: Be brief.\nuser: Hi\nassistant:"
    assert chat.render(None) == chat.render(plain)
    assert plain.chat_template is None  # the copy did not touch the original


# --- splits and limits --------------------------------------------------------------------------

def many_rows(n=300):
    return [{"prompt": f"prompt number {i}"} for i in range(n)]


def test_user_data_split_deterministic_disjoint_complete(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", many_rows())
    train, ev, every = load_data(f, "train"), load_data(f, "eval"), load_data(f)
    assert load_data(f, "eval") == ev
    assert {r.id for r in train}.isdisjoint({r.id for r in ev})
    assert sorted(r.id for r in train + ev) == sorted(r.id for r in every)
    assert 10 < len(ev) < 60
    assert all(split_of(content_key(r)) == "eval" for r in ev)
    assert load_data(f, "all") == every


def test_user_data_split_follows_content_not_position(tmp_path):
    rows = many_rows()
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", list(reversed(rows)) + [rows[0]])  # reordered + a duplicate
    ev_a = {r.prompt for r in load_data(a, "eval")}
    ev_b = [r.prompt for r in load_data(b, "eval")]
    assert set(ev_b) == ev_a
    tr_b = {r.prompt for r in load_data(b, "train")}
    assert not tr_b & set(ev_b), "a duplicated prompt must not sit in both splits"


def test_limit_and_empty_split(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", many_rows())
    assert load_data(f, "train", limit=5) == load_data(f, "train")[:5]
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"prompt": p} for p in ("a", "b") if split_of("p:" + p) == "train"])
    with pytest.raises(DataError, match="split 'all'") as e:
        load_data(tiny, "eval")
    assert str(tiny) in one_line_error(e)
    with pytest.raises(DsparkError, match="valid splits: train, eval, all"):
        load_data(f, "test")


def test_documents_and_protocol_use(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", many_rows(50) + [{"question": "q?"}])
    src = DataSource(f)
    docs = list(src.documents(None))
    assert docs[0] == "prompt number 0" and docs[-1] == "user: q?\nassistant:"
    counts = src.split_counts()
    assert counts["train"] + counts["eval"] == 51
    assert len(list(src.documents("eval"))) == counts["eval"]
    assert resolve_prompts(None, str(f), "all", 3) == src.prompts(None)[:3]


# --- malformed data -----------------------------------------------------------------------------

@pytest.mark.parametrize("lines, expected", [
    (['{"prompt": "ok"}', '{"prompt": "ok"}', '{"prompt": "no closing"'],
     "line 3: not valid JSON (Expecting ',' delimiter at column 24)"),
    (['{"prompt": "ok"}', '{"answer": 4, "id": 1}'],
     "line 2: record has none of the fields messages, prompt, text, question, instruction, turns "
     "(it has: answer, id)"),
    (['["a list"]'], "line 1: expected a JSON object with a prompt field, got a list"),
    (['{"prompt": 5}'], "line 1: field 'prompt' must be a string, got a number"),
    (['{"prompt": "  "}'], "line 1: field 'prompt' is empty"),
    (['{"messages": []}'], "line 1: field 'messages' must be a non-empty list of {role, content} "
                           "objects, got an empty list"),
    (['{"messages": [{"role": "human", "content": "hi"}]}'],
     "line 1: messages[1] has role 'human' (valid roles: system, user, assistant, tool)"),
    (['{"messages": [{"role": "user"}]}'], "line 1: messages[1] must be an object with 'role' and 'content'"),
    (['{"messages": [{"role": "user", "content": ["x"]}]}'], "line 1: messages[1] content must be a string, got a list"),
    (['{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}'],
     "line 1: field 'messages' has no user turn"),
    (['{"instruction": "do", "input": 3}'], "line 1: field 'input' must be a string, got a number"),
    (['{"turns": []}'], "line 1: field 'turns' must be a non-empty list of strings"),
])
def test_malformed_jsonl(tmp_path, lines, expected):
    f = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_data(f)
    assert one_line_error(e) == f"{f} {expected}"


@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.txt", "e.parquet"])
def test_empty_files(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_data(f)
    assert one_line_error(e) == f"file {f} is empty"


@pytest.mark.parametrize("name, content, expected", [
    ("w.jsonl", "\n  \n", "is empty (no JSON lines)"),
    ("w.txt", "\n \t\n", "is empty (no non-blank lines)"),
    ("w.json", "  \n", "is empty"),
    ("w.json", "[]", "is empty (an empty list)"),
    ("w.json", '{"prompt": "x"}', ": expected a JSON list of records, got a dict"),
])
def test_blank_or_empty_content(tmp_path, name, content, expected):
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(f)
    assert one_line_error(e) == f"file {f} {expected}".replace(" :", ":")


def test_json_lines_in_a_json_file_get_a_hint(tmp_path):
    f = write_jsonl(tmp_path / "data.json", [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(DataError) as e:
        load_data(f)
    assert one_line_error(e) == (f"{f} line 2: not valid JSON (Extra data); a file with one JSON object "
                                 f"per line must be named .jsonl")


def test_json_record_number_in_errors(tmp_path):
    f = tmp_path / "data.json"
    f.write_text(json.dumps([{"prompt": "ok"}, {"nothing": 1}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.json record 2: record has none of the fields"):
        load_data(f)


def test_parquet_missing_fields_and_garbage(tmp_path):
    f = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "ok"}, {"prompt": None}]), f)
    with pytest.raises(DataError) as e:
        load_data(f)
    assert one_line_error(e) == f"{f} row 2: record has none of the fields messages, prompt, text, question, instruction, turns (it has: prompt)"
    g = tmp_path / "garbage.parquet"
    g.write_bytes(b"this is not parquet" * 10)
    with pytest.raises(DataError, match=r"garbage\.parquet is not a valid parquet file") as e:
        load_data(g)
    one_line_error(e)


def test_wrong_extension_and_not_utf8(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("prompt\nhello\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(f)
    assert one_line_error(e) == (f"file {f} has an unsupported extension (.csv); use .jsonl/.json/.parquet/.txt "
                                 f"(or .jsonl.gz/.json.gz/.txt.gz)")
    g = tmp_path / "latin1.txt"
    g.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text"):
        load_data(g)


def test_missing_paths(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(tmp_path / "nope.jsonl")
    assert one_line_error(e) == f"no such file: {tmp_path / 'nope.jsonl'}"
    with pytest.raises(DataError, match="not a hub dataset id"):
        load_data(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(DataError, match="data source is empty"):
        load_data("  ")


def test_utf8_bom_is_tolerated(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "with bom"}).encode() + b"\n")
    assert load_data(f)[0].prompt == "with bom"


def test_prompt_record_hashable_with_messages():
    r = PromptRecord(id="x", messages=({"role": "user", "content": "hi"},))
    assert {r: 1}[PromptRecord(id="x", messages=({"role": "user", "content": "hi"},))] == 1


# --- the real evaluation sets shipped beside the repo ----------------------------------------------

@pytest.mark.parametrize("rel, n, field", [
    ("gsm8k/test.jsonl", 1319, "question"),
    ("spec_bench/question.jsonl", 480, "turns"),
    ("humaneval/HumanEval.jsonl.gz", 164, "prompt"),
    ("summarization/xsum.jsonl", 200, "prompt"),
])
def test_shared_eval_sets_load(rel, n, field):
    path = SHARED / "data" / rel
    if not path.exists():
        pytest.skip(f"missing {path}")
    recs = load_data(path)
    assert len(recs) == n
    assert {r.meta["field"] for r in recs} == {field}
