"""The `code` task: deterministic split by file, prompt shapes, on a small tree and the real stdlib."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

from dspark.tasks import SPLITS, get_task, split_of
from dspark.tasks.code import CodeTask, function_prompts, prefix_prompt, stdlib_files


def _file_of(record) -> str:
    return record.source.split(":", 1)[1]


def test_split_of_is_pinned():
    # The built-in models were trained on this split: a changed hash would leak eval files into training.
    assert [split_of(k) for k in ("_compression.py", "bz2.py", "calendar.py")] == ["eval"] * 3
    assert [split_of(k) for k in ("os.py", "json/decoder.py", "typing.py", "ast.py")] == ["train"] * 4
    assert split_of("x", eval_percent=0) == "train" and split_of("x", eval_percent=100) == "eval"


def test_split_roughly_ten_percent_of_many_keys():
    evals = sum(split_of(f"pkg/mod_{i}.py") == "eval" for i in range(2000))
    assert 120 < evals < 280


def test_stdlib_split_is_disjoint_complete_and_by_file():
    task = CodeTask()
    train = [rel for rel, _ in task.files("train")]
    ev = [rel for rel, _ in task.files("eval")]
    assert train and ev
    assert not set(train) & set(ev)
    assert sorted(train + ev) == [rel for rel, _ in stdlib_files()]
    assert all(split_of(rel) == "eval" for rel in ev)
    assert not any(part in {"test", "tests", "site-packages", "idle_test"}
                   for rel in train + ev for part in rel.split("/")[:-1])


def test_stdlib_split_is_the_same_in_another_process():
    # Python's own hash() is salted per process; the split must not be.
    code = "from dspark.tasks.code import CodeTask; print('\\n'.join(r for r, _ in CodeTask().files('eval')))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == [rel for rel, _ in CodeTask().files("eval")]


def test_stdlib_prompts_deterministic_disjoint_and_shaped():
    task = get_task("code")
    ev = task.prompts("eval", limit=40)
    assert ev == task.prompts("eval", limit=40)
    assert len(ev) == 40
    eval_files = {_file_of(r) for r in ev}
    assert len(eval_files) > 10, "a small limit should still span many files"
    assert all(split_of(f) == "eval" for f in eval_files)
    train = task.prompts("train", limit=40)
    assert not eval_files & {_file_of(r) for r in train}
    for r in ev:
        assert r.messages is None and r.render(None) == r.prompt
        assert r.meta["kind"] == "function"
        name = r.meta["name"]
        assert re.search(rf"def\s+{name}\s*\(", r.prompt), r.id
        last = r.prompt.rstrip()
        assert last.endswith(('"""', "'''", '"', "'")), f"{r.id} does not end with its docstring"
        assert len(r.prompt) <= 1200


def test_documents_match_files_of_the_split(tmp_path):
    root = _small_tree(tmp_path)
    task = CodeTask(root=str(root))
    for split in SPLITS:
        expected = [open(full, encoding="utf-8").read() for _, full in task.files(split)]
        assert list(task.documents(split)) == [t for t in expected if t.strip()]


def _small_tree(tmp_path):
    root = tmp_path / "lib"
    func = textwrap.dedent('''\
        import os

        CONSTANT = 1


        def helper_{i}(path, mode="r"):
            """Open {{path}} and return its first line."""
            with open(path, mode) as fh:
                return fh.readline()


        class Thing:
            @staticmethod
            def method(x):
                """Double x."""
                return 2 * x

            def no_doc(self):
                return 0
        ''')
    filler = "".join(f"VALUE_{k} = {k}\n" for k in range(30))
    for i in range(40):
        sub = root / ("pkg" if i % 2 else "") / f"mod_{i}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_text(func.format(i=i) + filler, encoding="utf-8")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text(func.format(i=99), encoding="utf-8")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third.py").write_text(func.format(i=98), encoding="utf-8")
    (root / "broken.py").write_text("def f(:\n", encoding="utf-8")
    return root


def test_small_tree_split_prompts_and_exclusions(tmp_path):
    root = _small_tree(tmp_path)
    task = CodeTask(root=str(root))
    files = {s: [rel for rel, _ in task.files(s)] for s in SPLITS}
    assert "tests/test_x.py" not in files["train"] + files["eval"]
    assert "site-packages/third.py" not in files["train"] + files["eval"]
    assert files["eval"], "40 files should give at least one eval file"
    for split in SPLITS:
        prompts = task.prompts(split)
        by_kind = {"function": set(), "prefix": set()}
        for r in prompts:
            assert _file_of(r) in files[split]
            by_kind[r.meta["kind"]].add(_file_of(r))
        good = set(files[split]) - {"broken.py"}
        assert by_kind["function"] == good and by_kind["prefix"] == good
        # two documented functions per file (helper_i and Thing.method); no_doc has no docstring
        assert sum(r.meta["kind"] == "function" for r in prompts) == 2 * len(good)
    one = [r for r in task.prompts("train") if r.meta.get("name", "").startswith("helper_")][0]
    # the def is on line 6: the context (up to 8 lines before it) reaches the top of the file
    assert one.prompt.startswith("import os\n\nCONSTANT = 1\n\n\ndef helper_")
    assert one.prompt.rstrip().endswith('return its first line."""')
    assert task.describe_source() == f"stdlib:{root}"


def test_limit_interleaves_across_files(tmp_path):
    task = CodeTask(root=str(_small_tree(tmp_path)))
    first = task.prompts("train", limit=5)
    assert len(first) == 5
    assert len({_file_of(r) for r in first}) == 5
    every = task.prompts("train")
    assert first == every[:5]
    # past one prompt per file the second layer and then the file prefixes follow
    n_files = len({_file_of(r) for r in every})
    for limit in (n_files, n_files + 3, len(every) - 2, len(every) + 10):
        assert task.prompts("train", limit=limit) == every[:limit]
    assert [r.meta["kind"] for r in every[n_files:2 * n_files]] == ["function"] * n_files
    assert every[-1].meta["kind"] == "prefix"


def test_function_prompts_need_docstring_and_body():
    src = textwrap.dedent('''\
        def only_doc():
            """No body after the docstring."""


        def good(a, b):
            """Add."""
            return a + b
        ''')
    recs = function_prompts("m.py", src)
    assert [r.meta["name"] for r in recs] == ["good"]
    ast.parse(recs[0].prompt + "\n    pass\n")  # context + signature + docstring is a valid prefix
    assert function_prompts("bad.py", "def (:") == []
    assert prefix_prompt("short.py", "x = 1\n") is None


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_bad_limit_is_a_user_error(limit):
    from dspark.errors import DsparkError
    from dspark.tasks import resolve_prompts

    with pytest.raises(DsparkError, match="limit"):
        resolve_prompts("code", None, "eval", limit)
