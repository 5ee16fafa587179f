"""Serve fixtures: one bundle of the built-in pair (target tiny-code-draft-m, draft tiny-code-draft-s)
and one real uvicorn server on a free 127.0.0.1 port, shared by the module's tests. Offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.common import offline_env

REPO = Path(__file__).resolve().parents[2]
BUILTIN = REPO / "dspark" / "models" / "builtin"
TARGET, DRAFT = "tiny-code-draft-m", "tiny-code-draft-s"


def _need_pair() -> None:
    for name in (TARGET, DRAFT):
        if not (BUILTIN / name).is_dir():
            pytest.skip(f"built-in model {name} is not built yet")


@pytest.fixture(scope="session")
def serve_bundle_dir(tmp_path_factory):
    _need_pair()
    from dspark.bundle.export import export_bundle

    out = tmp_path_factory.mktemp("serve") / "bundle"
    with offline_env():
        export_bundle(out, target=TARGET, draft=DRAFT, name="tiny-pair")
    return out


@pytest.fixture(scope="session")
def runtime(serve_bundle_dir):
    import torch

    from dspark.serve.runtime import runtime_from_bundle

    torch.manual_seed(0)
    with offline_env():
        return runtime_from_bundle(serve_bundle_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(runtime):
    """A real uvicorn server (background thread) with a generous batch window, so requests sent
    together are batched together."""
    from dspark.serve.app import create_app
    from dspark.serve.runner import start_in_thread

    app = create_app(runtime, max_batch_size=8, batch_window_s=0.1)
    running = start_in_thread(app, "127.0.0.1", 0)
    running.app = app
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
