"""Task registry, hub-backed tasks (offline, no network), `resolve_prompts`, `dspark tasks`."""

from __future__ import annotations

import json

import datasets  # noqa: F401  imported before the `offline` fixture sets the env, as in a long-lived process
import pytest
from typer.testing import CliRunner

from dspark.cli import app
from dspark.errors import DataError, DsparkError
from dspark.tasks import (TASKS, DataSource, describe_sources, get_task, resolve_prompts, resolve_source,
                          source_prompts)
from dspark.tasks import hubtasks
from dspark.tasks.code import CodeTask
from dspark.tasks.hub import looks_like_hub_id, parse_hub_spec

HUB_TASKS = {
    "chat": ("HuggingFaceH4/ultrachat_200k", None, {"train": "train_sft", "eval": "test_sft"}),
    "summarize": ("abisee/cnn_dailymail", "3.0.0", {"train": "train", "eval": "test"}),
    "math": ("openai/gsm8k", "main", {"train": "train", "eval": "test"}),
}


def test_registry_names_and_unknown_task():
    assert list(TASKS) == ["code", "chat", "summarize", "math"]
    assert isinstance(get_task("code"), CodeTask)
    with pytest.raises(DsparkError) as e:
        get_task("poetry")
    assert str(e.value) == "unknown task 'poetry' (valid tasks: chat, code, math, summarize)"


@pytest.mark.parametrize("name", list(HUB_TASKS))
def test_hub_task_defaults(name):
    task = get_task(name)
    dataset, config, splits = HUB_TASKS[name]
    assert (task.name, task.dataset, task.config, task.splits) == (name, dataset, config, splits)
    assert task.describe_source().startswith(f"hub:{dataset}")


@pytest.mark.parametrize("name", list(HUB_TASKS))
def test_hub_task_offline_is_a_one_line_data_error(offline, name):
    with pytest.raises(DataError) as e:
        get_task(name).prompts("eval", limit=2)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"dataset {HUB_TASKS[name][0]!r} is not available locally")
    assert msg.endswith("pass a local .jsonl/.json/.parquet/.txt file or folder with --data FILE")
    assert offline == [], f"tried the network: {offline}"


def test_hub_id_as_data_offline(offline):
    with pytest.raises(DataError, match=r"^dataset 'someone/some-dataset' is not available locally"):
        resolve_prompts(None, "someone/some-dataset:validation", "eval", 3)
    assert offline == []


def test_hub_id_parsing(tmp_path, monkeypatch):
    assert parse_hub_spec("openai/gsm8k") == ("openai/gsm8k", None, None)
    assert parse_hub_spec("openai/gsm8k:test") == ("openai/gsm8k", None, "test")
    assert parse_hub_spec("openai/gsm8k:main:test") == ("openai/gsm8k", "main", "test")
    for bad in ("gsm8k", "a/b/c", "/abs/path", "./x/y", "a/b:c:d:e"):
        assert not looks_like_hub_id(bad)
    assert DataSource("owner/name").kind == "hub"
    # an existing path wins over the hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    (tmp_path / "owner" / "name" / "p.txt").write_text("local wins\n", encoding="utf-8")
    assert DataSource("owner/name").kind == "folder"
    assert resolve_prompts(None, "owner/name", "all")[0].prompt == "local wins"


def fake_rows(name):
    if name == "chat":
        return [{"prompt": f"q{i}", "prompt_id": str(i),
                 "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
                              {"role": "user", "content": f"more {i}"}, {"role": "assistant", "content": "ok"}]}
                for i in range(5)]
    if name == "summarize":
        return [{"article": f"Article {i} text.", "highlights": f"Summary {i}.", "id": f"h{i}"} for i in range(5)]
    return [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(5)]


@pytest.mark.parametrize("name", list(HUB_TASKS))
def test_hub_task_rows_to_prompts(monkeypatch, name):
    calls = []

    def rows(dataset_id, split_name="train", data_dir=None, config=None):
        calls.append((dataset_id, split_name, config))
        yield from fake_rows(name)

    monkeypatch.setattr(hubtasks, "load_hub_rows", rows)
    task = get_task(name)
    dataset, config, splits = HUB_TASKS[name]
    recs = task.prompts("eval", limit=3)
    assert calls == [(dataset, splits["eval"], config)]
    assert len(recs) == 3 and recs[0].id == f"{dataset}:{splits['eval']}:0"
    first = recs[0].messages
    assert recs[0].prompt is None and first[-1]["role"] == "user"
    if name == "chat":
        assert [m["content"] for m in first] == ["q0", "a0", "more 0"]
    elif name == "summarize":
        assert first == ({"role": "user", "content": "Summarize: Article 0 text."},)
        assert recs[0].meta["reference"] == "Summary 0."
    else:
        assert first == ({"role": "user", "content": "What is 0 + 0?"},)
        assert recs[0].meta["reference"].endswith("#### 0")
    task.prompts("train", limit=1)
    assert calls[-1] == (dataset, splits["train"], config)
    docs = list(task.documents("train"))
    assert len(docs) == 5 and all(docs)


def test_hub_task_bad_row_names_the_row(monkeypatch):
    monkeypatch.setattr(hubtasks, "load_hub_rows", lambda *a, **k: iter([{"question": "ok?"}, {"answer": "4"}]))
    with pytest.raises(DataError) as e:
        get_task("math").prompts("eval")
    assert str(e.value) == "openai/gsm8k test row 2: expected a non-empty string field 'question'"


def test_resolve_needs_exactly_one_source(tmp_path):
    with pytest.raises(DsparkError, match="not both"):
        resolve_prompts("code", "data.jsonl", "eval", 1)
    with pytest.raises(DsparkError, match=r"give a task \(code, chat, summarize, math\) or data"):
        resolve_source(None, None)
    with pytest.raises(DsparkError, match="unknown task 'nope'"):
        resolve_prompts("nope", None)
    with pytest.raises(DsparkError, match="unknown split 'validation'"):
        resolve_prompts("code", None, "validation", 1)


def test_resolve_code_task_splits():
    ev = resolve_prompts("code", None, "eval", 3)
    assert ev == get_task("code").prompts("eval", 3)
    both = resolve_prompts("code", None, "all", 4)
    assert both == get_task("code").prompts("train", 4)  # "all": train first, up to the limit


def test_source_prompts_all_spans_both_splits(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    src = '''def f{i}(x):\n    """Doc {i}."""\n    return x\n'''
    for i in range(30):
        (root / f"m{i}.py").write_text(src.format(i=i), encoding="utf-8")
    task = CodeTask(root=str(root))
    every = source_prompts(task, None)
    assert every == task.prompts("train") + task.prompts("eval")
    assert task.prompts("eval"), "30 files should give an eval file"


def test_describe_sources_offline(offline):
    rows = {r["name"]: r for r in describe_sources(count=False)}
    assert list(rows) == ["code", "chat", "summarize", "math"]
    assert rows["code"]["available"] and rows["code"]["note"].endswith("eval files")
    for name in HUB_TASKS:
        assert rows[name]["available"] is False and rows[name]["counts"] is None
    assert offline == []


runner = CliRunner()


def test_cli_tasks_json_offline(offline):
    res = runner.invoke(app, ["tasks", "--no-counts", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == ["code", "chat", "summarize", "math"]
    assert {k for r in rows for k in r} == {"name", "kind", "description", "source", "available", "counts", "note"}
    assert offline == []


def test_cli_tasks_data(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(40)), encoding="utf-8")
    res = runner.invoke(app, ["tasks", "--data", str(f), "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert row["kind"] == "data" and row["available"] is True
    assert row["counts"] == DataSource(f).split_counts() and sum(row["counts"].values()) == 40
    table = runner.invoke(app, ["tasks", "--data", str(f)])
    assert table.exit_code == 0 and "d.jsonl" in table.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n', encoding="utf-8")
    res = runner.invoke(app, ["tasks", "--data", str(bad)])
    assert res.exit_code == 2
    assert "error:" in res.output and "bad.jsonl line 2: not valid JSON" in res.output.replace("\n", "")
