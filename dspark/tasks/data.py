"""User data (`--data`): a local file, a folder of files, or a hub dataset id -> `PromptRecord`s.

Files, by extension (gzip-compressed .jsonl.gz / .json.gz / .txt.gz work too):
  .jsonl    one JSON object per line (blank lines are skipped)
  .json     a JSON list of such objects
  .parquet  a table whose columns are the fields
  .txt      every non-blank line is one plain-text prompt
The fields of an object (prompt, messages, and the aliases text, question, instruction(+input),
turns) are described in `dspark.tasks.records`.
A folder: every file with one of these extensions under it (recursively; hidden entries skipped),
in sorted path order; other files are ignored.
A hub id: anything that is not an existing path and looks like `owner/name`, optionally
`owner/name:split` or `owner/name:config:split` (the dataset's split defaults to "train").

Split: a record is in `train` or `eval` (10%) by a hash of its content, so the split is the same on
every machine and run, and a record keeps its split when other records are added or moved.
`split=None` (or "all") takes every record. Errors name the file (and the line, for .jsonl).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import IO, Iterator

from dspark.errors import DataError
from dspark.tasks.base import EVAL_PERCENT, PromptRecord, SplitArg, check_limit, check_split, split_of
from dspark.tasks.hub import cached_num_rows, load_hub_rows, looks_like_hub_id, parse_hub_spec
from dspark.tasks.records import content_key, plain_text, record_from_row

FORMATS: dict[str, str] = {
    ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt",
    ".jsonl.gz": "jsonl", ".json.gz": "json", ".txt.gz": "txt",
}
SUPPORTED = ".jsonl/.json/.parquet/.txt"


def file_format(path: str | os.PathLike) -> str | None:
    name = Path(path).name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def _open_text(path: Path) -> IO[str]:
    # utf-8-sig: tolerate the byte-order mark some editors write
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _read_jsonl(path: Path, rel: str, label: str) -> Iterator[PromptRecord]:
    n = 0
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{label} line {lineno}"
            try:
                row = json.loads(line.rstrip())
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            n += 1
            yield record_from_row(row, f"{rel}:{lineno}", f"data:{rel}", where)
    if n == 0:
        raise DataError(f"file {label} is empty (no JSON lines)")


def _read_json(path: Path, rel: str, label: str) -> Iterator[PromptRecord]:
    with _open_text(path) as fh:
        text = fh.read()
    if not text.strip():
        raise DataError(f"file {label} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; a file with one JSON object per line must be named .jsonl" if e.msg == "Extra data" else ""
        raise DataError(f"{label} line {e.lineno}: not valid JSON ({e.msg}){hint}") from None
    if not isinstance(data, list):
        raise DataError(f"file {label}: expected a JSON list of records, got a {type(data).__name__}")
    if not data:
        raise DataError(f"file {label} is empty (an empty list)")
    for i, row in enumerate(data, 1):
        yield record_from_row(row, f"{rel}:{i}", f"data:{rel}", f"{label} record {i}")


def _read_parquet(path: Path, rel: str, label: str) -> Iterator[PromptRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"file {label} is not a valid parquet file ({first})") from None
    if pf.metadata.num_rows == 0:
        raise DataError(f"file {label} is empty (0 rows)")
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            i += 1
            yield record_from_row(row, f"{rel}:{i}", f"data:{rel}", f"{label} row {i}")


def _read_txt(path: Path, rel: str, label: str) -> Iterator[PromptRecord]:
    n = 0
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            n += 1
            yield PromptRecord(id=f"{rel}:{lineno}", prompt=text, source=f"data:{rel}", meta={"field": "line"})
    if n == 0:
        raise DataError(f"file {label} is empty (no non-blank lines)")


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "txt": _read_txt}


def _unsupported(path: Path, label: str) -> DataError:
    ext = "".join(path.suffixes[-2:]) or "no extension"
    return DataError(f"file {label} has an unsupported extension ({ext}); use {SUPPORTED} "
                     f"(or .jsonl.gz/.json.gz/.txt.gz)")


def read_file(path: str | os.PathLike, rel: str | None = None, label: str | None = None) -> Iterator[PromptRecord]:
    """Every record of one file, in file order. `rel` prefixes record ids; `label` names it in errors."""
    path = Path(path)
    rel = rel or path.name
    label = label or str(path)
    fmt = file_format(path)
    if fmt is None:
        raise _unsupported(path, label)
    if path.stat().st_size == 0:
        raise DataError(f"file {label} is empty")
    try:
        yield from _READERS[fmt](path, rel, label)
    except UnicodeDecodeError as e:
        raise DataError(f"file {label} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"file {label} is not a valid gzip file ({e})") from None


def folder_files(root: str | os.PathLike) -> list[Path]:
    """Data files under `root` (recursive, hidden entries skipped), sorted by relative path."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for fn in filenames:
            if not fn.startswith(".") and file_format(fn):
                out.append(Path(dirpath) / fn)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


class DataSource:
    """User data usable wherever a task is (`prompts`, `documents`, `describe_source`)."""

    def __init__(self, src: str | os.PathLike):
        self.src = str(src)
        self.name = self.src
        if not self.src.strip():
            raise DataError("data source is empty: give a file, a folder or a hub dataset id (owner/name)")
        path = Path(self.src).expanduser()
        self.path = path
        self.hub: tuple[str, str | None, str | None] | None = None
        if path.is_dir():
            self.kind = "folder"
            self.files = folder_files(path)
            if not self.files:
                raise DataError(f"folder {self.src} has no {SUPPORTED} files")
        elif path.is_file():
            self.kind = "file"
            self.files = [path]
            if file_format(path) is None:
                raise _unsupported(path, self.src)
        elif path.exists():
            raise DataError(f"{self.src} is neither a regular file nor a folder")
        elif looks_like_hub_id(self.src) and file_format(self.src) is None:
            self.kind = "hub"
            self.files = []
            self.hub = parse_hub_spec(self.src)
        elif file_format(self.src) is not None:
            raise DataError(f"no such file: {self.src}")
        else:
            raise DataError(f"no such file or folder: {self.src}, and it is not a hub dataset id (owner/name)")
        self.description = f"user data ({self.kind})"

    def describe_source(self) -> str:
        if self.hub is not None:
            dataset, config, split = self.hub
            return f"hub:{dataset}" + (f" ({config})" if config else "") + f" split={split or 'train'}"
        if self.kind == "folder":
            return f"folder:{self.path.resolve()} ({len(self.files)} files)"
        return f"file:{self.path.resolve()}"

    def records(self) -> Iterator[PromptRecord]:
        """Every record, in order, validated as it is read."""
        if self.hub is not None:
            dataset, config, split = self.hub
            split = split or "train"
            for i, row in enumerate(load_hub_rows(dataset, split, config=config)):
                yield record_from_row(row, f"{dataset}:{split}:{i}", f"hub:{dataset}", f"{dataset} {split} row {i + 1}")
            return
        if self.kind == "file":
            yield from read_file(self.path, label=self.src)
            return
        for f in self.files:
            rel = f.relative_to(self.path).as_posix()
            yield from read_file(f, rel=rel, label=str(Path(self.src) / rel))

    def prompts(self, split: SplitArg = "eval", limit: int | None = None) -> list[PromptRecord]:
        """The records of `split` (None / "all": every record), in order, at most `limit`."""
        split = check_split(split)
        limit = check_limit(limit)
        out: list[PromptRecord] = []
        seen = 0
        for rec in self.records():
            seen += 1
            if split is None or split_of(content_key(rec)) == split:
                out.append(rec)
                if limit is not None and len(out) >= limit:
                    break
        if not out:
            raise DataError(f"{self.src}: none of its {seen} records falls in the {split!r} split (about "
                            f"{EVAL_PERCENT}% of records go to 'eval', by content); give more records or "
                            f"use split 'all'")
        return out

    def documents(self, split: SplitArg = "train") -> Iterator[str]:
        split = check_split(split)
        for rec in self.records():
            if split is None or split_of(content_key(rec)) == split:
                yield plain_text(rec)

    def split_counts(self) -> dict[str, int]:
        """Records per split; reads (and so validates) everything."""
        counts = {"train": 0, "eval": 0}
        for rec in self.records():
            counts[split_of(content_key(rec))] += 1
        return counts

    def info(self, count: bool = True) -> dict:
        available = True
        note = ""
        if self.hub is not None:
            dataset, config, split = self.hub
            available = cached_num_rows(dataset, split or "train", config=config) is not None
            note = "" if available else "not cached here: downloaded on first use (needs network)"
        counts = self.split_counts() if count and available else None
        return {"name": self.name, "kind": "data", "description": self.description,
                "source": self.describe_source(), "available": available, "counts": counts, "note": note}


def load_data(src: str | os.PathLike, split: SplitArg = None, limit: int | None = None) -> list[PromptRecord]:
    """Prompt records from a .jsonl/.json/.parquet/.txt file, a folder of them, or a hub id."""
    return DataSource(src).prompts(split, limit)
