"""Turning `--candidates` arguments into the list select scores.

Each argument is one of:
- a glob (`runs/*/candidates/*.yaml`, `**` allowed) or a path of a candidate YAML file;
- a folder: a model folder (config.json) is an ad-hoc candidate named after the folder; any other
  folder contributes its *.yaml files;
- a model name (built-in, alias or hub id) that is on this machine: an ad-hoc candidate
  (`quantization: none`, `draft_length: auto`).
A glob or path that matches nothing is an error before anything loads (a typo should not silently
shrink the comparison). A YAML file that is not a valid candidate is kept, as a failed entry with
the reason, so it shows up in the report (when no candidate at all can be read, `select` fails at
once instead).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from dspark.config.candidate import Candidate, load_candidate, resolve_relative
from dspark.errors import DsparkError

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class Entry:
    """One candidate to score. `error` set: it could not even be read (status failed)."""

    name: str
    source: str
    spec: Candidate | None = None
    draft: str | None = None
    error: str | None = None


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _from_file(path: Path) -> Entry:
    try:
        spec = load_candidate(path)
    except DsparkError as e:
        return Entry(name=path.stem if path.name != "candidate.yaml" else path.parent.name, source=str(path),
                     error=str(e))
    return Entry(name=spec.name, source=str(path), spec=spec, draft=resolve_relative(spec.draft, path))


def _adhoc(name: str, draft: str, source: str) -> Entry:
    spec = Candidate(name=name, draft=draft)
    return Entry(name=name, source=source, spec=spec, draft=draft)


def expand(argument: str) -> list[Entry]:
    """The entries one --candidates argument stands for (see the module docstring)."""
    from dspark.models.registry import resolve_model

    arg = str(argument).strip()
    if not arg:
        raise DsparkError("--candidates got an empty value")
    if _is_glob(arg):
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(arg), recursive=True))
        files = [p for p in paths if p.is_file() and p.suffix.lower() in YAML_SUFFIXES]
        if not files:
            raise DsparkError(f"--candidates {arg!r} matched no candidate files (*.yaml)")
        return [_from_file(p) for p in files]
    path = Path(arg).expanduser()
    if path.is_file():
        if path.suffix.lower() not in YAML_SUFFIXES:
            raise DsparkError(f"--candidates {arg!r} is not a candidate file (.yaml) nor a model folder")
        return [_from_file(path)]
    if path.is_dir():
        if (path / "config.json").is_file():
            return [_adhoc(path.resolve().name, str(path.resolve()), str(path))]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in YAML_SUFFIXES)
        if not files:
            raise DsparkError(f"--candidates {arg!r} is a folder with neither config.json nor candidate files")
        return [_from_file(p) for p in files]
    r = resolve_model(arg)
    if r.kind in ("builtin", "alias", "hub") and r.available:
        return [_adhoc(arg, arg, arg)]
    raise DsparkError(f"--candidates {arg!r} matched no files and is not a model on this machine (give candidate "
                      "YAML files, a glob of them, a model folder, or a built-in / cached model name)")


def gather(arguments: list[str]) -> list[Entry]:
    """Every entry of every argument, a file named twice counted once; names must be unique."""
    if not arguments:
        raise DsparkError("give at least one --candidates GLOB")
    entries: list[Entry] = []
    seen_sources: set[str] = set()
    for a in arguments:
        for e in expand(a):
            key = str(Path(e.source).resolve()) if Path(e.source).exists() else e.source
            if key in seen_sources:
                continue
            seen_sources.add(key)
            entries.append(e)
    by_name: dict[str, str] = {}
    for e in entries:
        if e.name in by_name:
            raise DsparkError(f"two candidates are named {e.name!r} ({by_name[e.name]} and {e.source}): candidate "
                              "names must be unique in one select run")
        by_name[e.name] = e.source
    return entries
