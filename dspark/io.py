"""Atomic file writes: a crash never leaves a half-written file behind; output folder checks."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from dspark.errors import DsparkError


def check_out_folder(out: str | os.PathLike, what: str) -> Path:
    """An `--out` folder path, refused at once (before any work) when it names an existing file."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise DsparkError(f"--out {str(path)!r} is a file: pass a folder for {what}")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any, header: str | None = None) -> Path:
    body = yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)
    if header:
        body = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body
    return atomic_write_text(path, body)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move a finished folder built aside (`tmp`) into place at `out`. An existing `out` is swapped
    out first and deleted last, so a crash leaves either the new folder or the old one, never half."""
    import shutil
    import uuid

    tmp, out = Path(tmp), Path(out)
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(trash, out)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return out
