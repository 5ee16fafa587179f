"""Quantize test settings: offline, one torch thread (the suite shares 2 cores), the built-in family."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILTIN = REPO / "dspark" / "models" / "builtin"
TARGET, DRAFT = "tiny-code", "tiny-code-draft-s"


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def need_builtins(*names: str) -> None:
    for n in names:
        if not (BUILTIN / n).is_dir():
            pytest.skip(f"built-in model {n} is not built")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
