"""Shared fixtures: every models test runs offline against an empty, private Hugging Face cache, so
nothing can download and the user's own cache cannot change the results."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO.parent / "shared" / "models" / "stories260K"
BUILTIN = REPO / "dspark" / "models" / "builtin"


def builtin_ready(name: str) -> bool:
    return (BUILTIN / name).is_dir()


@pytest.fixture(autouse=True)
def dspark_cache(tmp_path_factory, monkeypatch):
    """A private, empty dspark cache (converted GGUF models) per test."""
    cache = tmp_path_factory.mktemp("dspark-cache")
    monkeypatch.setenv("DSPARK_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def fake_hub_snapshot(cache: Path, hub_id: str, source: Path, files: list[str] | None = None,
                      commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay `source`'s files out as the Hugging Face cache does for `hub_id` at revision main
    (refs/main -> commit, snapshots/<commit>/<file> symlinked to the real file)."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files if files is not None else sorted(os.listdir(source)):
        (snap / f).symlink_to(source / f)
    return snap


@pytest.fixture(scope="session")
def stories():
    from dspark.models import load_model

    return load_model(str(STORIES), offline=True)
