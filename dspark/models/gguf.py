"""GGUF models: a `.gguf` file (or a folder holding one) is dequantized once, through transformers'
own GGUF support (the `gguf` package), into a plain safetensors folder in dspark's model cache, and
loaded from that folder afterwards like any Hugging Face model.

The cache (`DSPARK_CACHE`, default `$XDG_CACHE_HOME/dspark` or `~/.cache/dspark`) holds
`models/<sha256[:16]>/` per GGUF file: config.json, model.safetensors (float32: the dequantized
weights are the model, a narrower float would change them again), the tokenizer (with the file's
chat template), generation_config.json, and `dspark_gguf.json` (the file's sha256, name, where it was
seen). The folder is keyed by the file's content, so a copy elsewhere or a renamed file converts
once; it is built in a temporary sibling and renamed into place, so a crash or a concurrent
conversion never leaves a half-written folder (a lock file only saves the second process the work).

Finding a converted folder without hashing: `dspark_gguf.json` lists each path the file was seen at
with its size and mtime; a file whose (path, size, mtime) matches is taken to be the same file, as
`make` would. Anything else is hashed (about 1 s per GB) before it is used.

Nothing here imports torch or transformers at module level: name resolution stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from dspark.errors import DsparkError
from dspark.models.files import is_model_folder

CACHE_ENV = "DSPARK_CACHE"
GGUF_META = "dspark_gguf.json"
SUFFIX = ".gguf"
# Files beside a GGUF that travel with its converted folder (the license a redistribution needs).
_COPIED_BESIDE = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE")


def dspark_cache_dir() -> Path:
    """dspark's cache root, read from the environment at call time (tests redirect it)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "dspark"


def models_cache_dir(cache: Path | None = None) -> Path:
    return (cache if cache is not None else dspark_cache_dir()) / "models"


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` stands for: the file itself, or the one `.gguf` in a folder that is not
    a Hugging Face model folder (no config.json). None when `path` is not a GGUF model."""
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == SUFFIX)
    if len(found) > 1:
        raise DsparkError(f"folder {str(path)!r} holds {len(found)} GGUF files "
                          f"({', '.join(p.name for p in found)}): pass the one to use")
    return found[0] if found else None


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / GGUF_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _complete(folder: Path) -> bool:
    return is_model_folder(folder) and (folder / GGUF_META).is_file()


def converted_folder(sha256: str, cache: Path | None = None) -> Path | None:
    """The converted folder of the GGUF file with this sha256, if it is in the cache."""
    folder = models_cache_dir(cache) / sha256[:16]
    if not _complete(folder):
        return None
    meta = _read_meta(folder)
    return folder if meta is not None and meta.get("sha256") == sha256 else None


def _converted(cache: Path | None = None) -> Iterator[tuple[Path, dict]]:
    root = models_cache_dir(cache)
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not _complete(folder):
            continue
        meta = _read_meta(folder)
        if meta is not None:
            yield folder, meta


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def lookup_converted(gguf: Path, cache: Path | None = None) -> Path | None:
    """The converted folder of `gguf` if this exact file (path, size, mtime) was converted or seen
    before; no hashing."""
    key = _stat_key(gguf)
    for folder, meta in _converted(cache):
        if key in meta.get("seen_at", []):
            return folder
    return None


def converted_by_name(name: str, cache: Path | None = None) -> list[Path]:
    """Converted folders whose GGUF file was called `name` (with or without `.gguf`)."""
    stem = name[: -len(SUFFIX)] if name.lower().endswith(SUFFIX) else name
    return [folder for folder, meta in _converted(cache) if meta.get("name") == stem]


def list_converted(cache: Path | None = None) -> list[dict]:
    """Every converted GGUF in the cache: its folder and `dspark_gguf.json`."""
    return [{"folder": str(folder), **meta} for folder, meta in _converted(cache)]


def _remember_path(folder: Path, gguf: Path) -> None:
    """Add this file's (path, size, mtime) to the folder's record so the next lookup skips hashing.
    Two processes adding at once may lose one entry: that file is only hashed again next time."""
    from dspark.io import atomic_write_json

    meta = _read_meta(folder) or {}
    key = _stat_key(gguf)
    if key not in meta.get("seen_at", []):
        meta["seen_at"] = [*meta.get("seen_at", []), key]
        atomic_write_json(folder / GGUF_META, meta)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); elsewhere none, which only costs duplicated work."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def convert_gguf(gguf: str | os.PathLike, expected_sha256: str | None = None, cache: Path | None = None,
                 log: Callable[[str], None] = _stderr) -> Path:
    """The converted safetensors folder of a GGUF file: found in the cache, or made now (tens of
    seconds for a 100M-parameter model). `expected_sha256` (an alias's known file) must match."""
    from dspark.io import sha256_file

    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise DsparkError(f"GGUF file {str(gguf)!r} does not exist")
    found = lookup_converted(gguf, cache)
    if found is not None and (expected_sha256 is None or (_read_meta(found) or {}).get("sha256") == expected_sha256):
        return found
    sha = sha256_file(gguf)
    if expected_sha256 is not None and sha != expected_sha256:
        raise DsparkError(f"GGUF file {str(gguf)!r} has sha256 {sha[:16]}..., not the {expected_sha256[:16]}... "
                          "this model name stands for: pass the file's path to use it anyway")
    root = models_cache_dir(cache)
    out = root / sha[:16]
    with _lock(root / f".{sha[:16]}.lock"):
        done = converted_folder(sha, cache)
        if done is None:
            log(f"converting {gguf.name} to safetensors once (dequantizing: can take a minute) -> {out}")
            tmp = root / f".{sha[:16]}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                _convert_into(gguf, tmp, sha)
                if out.exists():  # not a complete conversion of this file (damaged by hand): never read
                    shutil.rmtree(out)
                os.rename(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            done = out
    _remember_path(done, gguf)
    return done


def _convert_into(gguf: Path, tmp: Path, sha256: str) -> None:
    """Dequantize `gguf` with transformers into the folder `tmp` (config, float32 safetensors,
    tokenizer with chat template, generation config, dspark_gguf.json written last)."""
    from importlib.metadata import version

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from dspark.io import atomic_write_json

    # dequantize=True: a plain dense model even where a packed-GGUF matmul kernel is installed
    # (a packed model cannot be saved, and dspark's decoder wants ordinary Linear layers).
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True), **kwargs)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, NotImplementedError) as e:
        text = str(e).strip().splitlines()
        raise DsparkError(f"could not convert GGUF file {str(gguf)!r} with transformers "
                          f"{transformers.__version__}: {type(e).__name__}: {text[0] if text else ''}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        raise DsparkError(f"transformers kept {gguf.name!r} quantized although asked to dequantize: "
                          "cannot write it as a safetensors folder")
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name in _COPIED_BESIDE:
        if (gguf.parent / name).is_file():
            shutil.copyfile(gguf.parent / name, tmp / name)
    atomic_write_json(tmp / GGUF_META, {
        "name": gguf.name[: -len(SUFFIX)], "file": gguf.name, "sha256": sha256, "bytes": gguf.stat().st_size,
        "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32", "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "converted_with": {"transformers": transformers.__version__, "gguf": version("gguf")},
        "seen_at": [_stat_key(gguf)]})


__all__ = ["CACHE_ENV", "GGUF_META", "convert_gguf", "converted_by_name", "converted_folder", "dspark_cache_dir",
           "find_gguf", "list_converted", "lookup_converted", "models_cache_dir"]
