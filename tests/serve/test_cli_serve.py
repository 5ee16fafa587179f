"""`dspark serve-bundle` as a user runs it: a real process on a free loopback port, with an API key."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from dspark.cli import app

STARTUP_S = 600  # model loading on a busy 2-core machine can be slow; this is a cap, not a measurement


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_serve_bundle_process_enforces_api_key_and_ends_requests_on_sigterm(serve_bundle_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("DSPARK_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "dspark", "serve-bundle", str(serve_bundle_dir), "--port", "0",
                             "--api-key", "s3cret", "--device", "cpu", "--dtype", "float32", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + STARTUP_S
        url = None
        while url is None:
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, "server exited:\n" + "".join(seen)
            seen.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            url = m.group(1) if m else None
        while True:  # the socket is bound before the app starts; wait for the app
            try:
                if httpx.get(url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)
            time.sleep(0.2)

        r = httpx.post(url + "/v1/completions", json={"model": "tiny-pair", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="guess", max_retries=0, timeout=300)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=300)
        assert [m.id for m in good.models.list().data] == ["tiny-pair"]
        out = good.completions.create(model="tiny-pair", prompt="def f(x):", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens >= 1 and "speculative" in out.model_dump()
        assert httpx.get(url + "/metrics", timeout=30).status_code == 200  # probes need no key

        # SIGTERM with requests in flight: each ends with an OpenAI-shaped error (503 / a final SSE error
        # event), not a plain-text 500 or a cut stream once uvicorn's graceful timeout runs out
        body = {"model": "tiny-pair", "prompt": "def f():", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
        auth = {"Authorization": "Bearer s3cret"}
        plain: dict = {}
        t = threading.Thread(target=lambda: plain.update(
            r=httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=300)))
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=auth,
                          timeout=300) as stream:
            lines = stream.iter_lines()
            events = [next(lines)]  # the stream is running
            t.start()
            while httpx.get(url + "/health", timeout=30).json()["running"] < 2:
                assert t.is_alive() and time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            events.extend(line for line in lines if line)
        t.join(300)
        assert plain["r"].status_code == 503 and plain["r"].json()["error"]["type"] == "server_error"
        assert events[-1] == "data: [DONE]" and "shutting down" in json.loads(events[-2][6:])["error"]["message"]
        proc.wait(60)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_bundle_cli_errors(tmp_path, serve_bundle_dir):
    runner = CliRunner()
    res = runner.invoke(app, ["serve-bundle", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "is not a folder" in res.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = runner.invoke(app, ["serve-bundle", str(serve_bundle_dir), "--port", str(port)])
    assert res.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in res.output
    res = runner.invoke(app, ["serve-bundle", str(serve_bundle_dir), "--max-batch-size", "0", "--port", "0"])
    assert res.exit_code == 2 and "--max-batch-size must be >= 1" in res.output
    res = runner.invoke(app, ["serve-bundle", str(serve_bundle_dir), "--threads", "0", "--port", "0"])
    assert res.exit_code == 2 and "--threads must be >= 1, got 0" in res.output


@pytest.mark.parametrize("args,needle", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--api-key", " s3cret "], "--api-key has leading or trailing whitespace"),
    (["--api-key", "clé"], "--api-key may hold only visible ASCII characters"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines: pass --api-key KEY"),
    (["--max-body-mb", "0"], "--max-body-mb must be > 0"),
])
def test_serve_bundle_checks_options_before_reading_the_bundle(tmp_path, monkeypatch, args, needle):
    """Each was found only after the bundle was hashed and both models loaded (or, for the keys and
    the open host, never: the server started but no client could authenticate, or anyone could call it)."""
    monkeypatch.delenv("DSPARK_API_KEY", raising=False)
    res = CliRunner().invoke(app, ["serve-bundle", str(tmp_path / "no-bundle"), "--port", "0", *args])
    assert res.exit_code == 2 and needle in res.output and "not a folder" not in res.output, res.output
    assert "s3cret" not in res.output  # a key is never echoed


def test_help_names_the_limits():
    from dspark.serve.protocol import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH

    res = CliRunner().invoke(app, ["serve-bundle", "--help"], env={"COLUMNS": "200"})
    text = " ".join(res.output.split())
    assert f"up to {MAX_SCHEMA_DEPTH} levels of nesting and {MAX_SCHEMA_BYTES // 1024} KiB" in text
    assert "--max-body-mb" in text and "--allow-no-key" in text and "[default: 8.0]" in text
