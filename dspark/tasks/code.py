"""The `code` task: real Python code.

Offline default: the Python source files of the running interpreter's standard library (test
suites and site-packages excluded), split by file. Prompts are (a) a function's signature plus its
docstring with a few lines of the file before it, and (b) file prefixes. With network, the hub
dataset `bigcode/the-stack-smol` (Python subset) can be used instead (`source="hub"`).
"""

from __future__ import annotations

import ast
import os
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from dspark.tasks.base import PromptRecord, Split, split_of

HUB_DATASET = "bigcode/the-stack-smol"
_EXCLUDED_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
CONTEXT_LINES = 8
MAX_PROMPT_CHARS = 1200
PREFIX_LINES = 12


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=4)
def stdlib_files(root: str | None = None) -> tuple[tuple[str, str], ...]:
    """(relative path, absolute path) of every stdlib .py file, sorted, tests excluded."""
    base = Path(root) if root else stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_PARTS)
        for fn in filenames:
            if fn.endswith(".py"):
                full = Path(dirpath) / fn
                out.append((full.relative_to(base).as_posix(), str(full)))
    return tuple(sorted(out))


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def function_prompts(rel: str, source: str) -> list[PromptRecord]:
    """Signature + docstring prompts (with up to CONTEXT_LINES lines before the def)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if not node.body or not isinstance(node.body[0], ast.Expr):
            continue
        doc = node.body[0].value
        if not (isinstance(doc, ast.Constant) and isinstance(doc.value, str)) or len(node.body) < 2:
            continue
        start = node.lineno - 1
        if node.decorator_list:
            start = min(d.lineno for d in node.decorator_list) - 1
        start = max(0, start - CONTEXT_LINES)
        end = node.body[0].end_lineno  # inclusive, 1-based
        text = "".join(lines[start:end])
        if len(text) > MAX_PROMPT_CHARS:
            continue
        out.append(PromptRecord(id=f"{rel}:{node.lineno}", prompt=text, source=f"stdlib:{rel}",
                                meta={"kind": "function", "name": node.name}))
    out.sort(key=lambda r: int(r.id.rsplit(":", 1)[1]))
    return out


def prefix_prompt(rel: str, source: str) -> PromptRecord | None:
    lines = source.splitlines(keepends=True)
    if len(lines) < PREFIX_LINES * 2:
        return None
    text = "".join(lines[:PREFIX_LINES])[:MAX_PROMPT_CHARS]
    return PromptRecord(id=f"{rel}:prefix", prompt=text, source=f"stdlib:{rel}", meta={"kind": "prefix"})


class CodeTask:
    name = "code"
    description = "Python code: function signatures with docstrings and file prefixes"
    hub_dataset = HUB_DATASET

    def __init__(self, root: str | None = None, source: str = "stdlib"):
        self.root = root
        self.source = source

    def describe_source(self) -> str:
        if self.source == "hub":
            return f"hub:{HUB_DATASET}"
        return f"stdlib:{self.root or stdlib_root()}"

    def info(self, count: bool = True) -> dict:
        if self.source == "hub":
            from dspark.tasks.hub import cached_num_rows

            available = cached_num_rows(HUB_DATASET, "train", data_dir="data/python") is not None
            return {"name": self.name, "kind": "built-in", "description": self.description,
                    "source": self.describe_source(), "available": available, "counts": None,
                    "note": "" if available else "not cached here: needs network once, or use --data FILE"}
        files = {s: len(self.files(s)) for s in ("train", "eval")}
        available = sum(files.values()) > 0
        counts = {s: len(self.prompts(s)) for s in ("train", "eval")} if count and available else None
        return {"name": self.name, "kind": "built-in", "description": self.description,
                "source": self.describe_source(), "available": available, "counts": counts,
                "note": f"{files['train']} train / {files['eval']} eval files" if available
                else "no Python source files found"}

    def files(self, split: Split) -> list[tuple[str, str]]:
        return [(rel, full) for rel, full in stdlib_files(self.root) if split_of(rel) == split]

    def documents(self, split: Split = "train") -> Iterator[str]:
        if self.source == "hub":
            yield from _hub_documents(split)
            return
        for _rel, full in self.files(split):
            text = _read(full)
            if text and text.strip():
                yield text

    def _per_file(self, split: Split) -> Iterator[tuple[list[PromptRecord], PromptRecord | None]]:
        """(function prompts, prefix prompt) of each file of the split, in order, parsed lazily."""
        if self.source == "hub":
            for i, text in enumerate(_hub_documents(split)):
                yield function_prompts(f"hub:{i}", text), None
            return
        for rel, full in self.files(split):
            text = _read(full)
            if text:
                yield function_prompts(rel, text), prefix_prompt(rel, text)

    def prompts(self, split: Split = "eval", limit: int | None = None) -> list[PromptRecord]:
        """Function prompts interleaved across files (so a small `limit` still spans many files),
        followed by file prefixes. Deterministic."""
        per_file: list[list[PromptRecord]] = []
        prefixes: list[PromptRecord] = []
        with_functions = 0
        for funcs, prefix in self._per_file(split):
            per_file.append(funcs)
            if prefix:
                prefixes.append(prefix)
            with_functions += bool(funcs)
            if limit is not None and limit >= 1 and with_functions >= limit:
                # the first interleaved layer (one prompt per file) already holds `limit` prompts:
                # the rest of the files cannot change the answer, so don't parse them
                return [fp[0] for fp in per_file if fp][:limit]
        out: list[PromptRecord] = []
        depth = 0
        while True:
            layer = [fp[depth] for fp in per_file if len(fp) > depth]
            if not layer:
                break
            out.extend(layer)
            depth += 1
            if limit is not None and len(out) >= limit:
                break
        out.extend(prefixes)
        return out[:limit] if limit is not None else out


def _hub_documents(split: Split) -> Iterator[str]:
    from dspark.tasks.hub import load_hub_rows

    for row in load_hub_rows(HUB_DATASET, split_name="train", data_dir="data/python"):
        key = str(row.get("path") or row.get("content", "")[:200])
        if split_of(key) == split and row.get("content"):
            yield row["content"]
