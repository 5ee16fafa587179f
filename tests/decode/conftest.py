"""Decoder test settings. `DSPARK_TEST_DEVICE` (default cpu; cuda / cuda:N on a GPU machine, as
benchmarks/gpu_check.sh sets it) picks the device of the `decode_device` fixture, so the same
losslessness tests run on CPU here and on CUDA where one is lent. Every decoder test runs offline."""

from __future__ import annotations

import os

import pytest

DEVICE_ENV = "DSPARK_TEST_DEVICE"


def requested_device() -> str:
    return os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu"


@pytest.fixture(scope="session")
def decode_device() -> str:
    """The torch device string decoder tests place models on. Asking for CUDA where there is none
    fails the test instead of quietly testing the CPU again."""
    import torch

    dev = requested_device()
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"{DEVICE_ENV}={dev!r} but torch sees no CUDA device")
    return dev


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
