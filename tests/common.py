"""Shared test helpers: repository paths, the built-in family, optional libraries, offline mode and
a single torch thread (the suite shares 2 cores; oversubscribed threads slow tiny models ~50x)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILTIN = REPO / "dspark" / "models" / "builtin"
STORIES = REPO.parent / "shared" / "models" / "stories260K"


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def need_builtins(*names: str) -> None:
    for n in names:
        if not (BUILTIN / n).is_dir():
            pytest.skip(f"built-in model {n} is not built")


OFFLINE_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def offline_env():
    """The offline switches set inside, restored on exit: for session and module fixtures, which
    cannot use monkeypatch."""
    from dspark.contain import restored_env

    with restored_env(OFFLINE_KEYS):
        os.environ.update({k: "1" for k in OFFLINE_KEYS})
        yield


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
