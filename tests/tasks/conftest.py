"""Fixtures for task-data tests: no test here may reach the network."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline mode set the way a user sets it (environment variables, here *after* `datasets` was
    imported), the caches pointed at empty folders, and every socket connection refused and recorded:
    the test fails fast (and can check `attempts == []`) instead of hanging on the network."""
    import datasets.config
    import huggingface_hub.constants as hconst

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(hconst, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network disabled in dspark tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts
