"""Shared test helpers: repository paths, the built-in family, optional libraries, offline mode and
a single torch thread (the suite shares 2 cores; oversubscribed threads slow tiny models ~50x)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import signal
import subprocess
import sys
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


CHILD_ENV = "DSPARK_TEST_CHILD"
CHILD_OUTPUT_SHOWN = 4000


def isolated(test):
    """Run this test in a child pytest process (same node id, same fixtures there): a native crash in
    a quantization library (bitsandbytes' 4-bit CPU kernel, gptqmodel) then fails this one test with
    the child's output instead of killing the whole suite. The parent skips the body."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if os.environ.get(CHILD_ENV):
            return test(*args, **kwargs)
        # 'path::name[params] (call)'; the path is relative to a rootdir the child may not share
        name = os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0].split("::", 1)[1]
        node = f"{test.__code__.co_filename}::{name}"
        env = {**os.environ, CHILD_ENV: "1", "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        env.pop("PYTEST_CURRENT_TEST", None)
        proc = subprocess.run([sys.executable, "-m", "pytest", node, "-q", "-o", "addopts=", "-p", "no:cacheprovider"],
                              env=env, capture_output=True, text=True)
        out = (proc.stdout + proc.stderr)[-CHILD_OUTPUT_SHOWN:]
        if proc.returncode < 0:
            pytest.fail(f"{node} crashed the child process with {signal.Signals(-proc.returncode).name}:\n{out}",
                        pytrace=False)
        if proc.returncode != 0 or " passed" not in proc.stdout:  # a skip in the child is no pass either
            pytest.fail(f"{node} failed in its child process (exit {proc.returncode}):\n{out}", pytrace=False)

    return wrapper
