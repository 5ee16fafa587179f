"""Run the app with uvicorn: in the foreground (`dspark serve-bundle`) or in a background thread
(tests, the quickstart). The socket is bound here, before uvicorn starts, so port 0 means "any free
port" and the caller learns the real one.

At shutdown (SIGTERM, Ctrl-C, `RunningServer.stop`) the scheduler is stopped before uvicorn waits for
open connections, so every request in flight ends with an OpenAI-shaped 503 (a stream with a final
error event) instead of being cut when uvicorn's graceful-shutdown timeout cancels its task.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from dspark.errors import DsparkError

DEFAULT_MAX_BODY_MB = 8.0  # request bodies above this are refused (413) before they are read whole


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise DsparkError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DsparkError(f"--host {host!r} cannot be resolved: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only when the listening
    # socket's proto is IPPROTO_TCP; with proto 0 Nagle's algorithm holds the second segment of every
    # response until the client's delayed ACK, adding ~40 ms to each keep-alive request
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise DsparkError(f"cannot listen on {host}:{port}: {e.strerror} (pass another --port)") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def set_threads(threads: int | None) -> None:
    """torch's intra-op CPU threads for this process (None: leave torch's default). Small models
    decode faster on one thread; large batches and prefill use more."""
    if threads is None:
        return
    if threads < 1:
        raise DsparkError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def make_server(app, log_level: str = "warning", before_shutdown: Callable[[], None] | None = None):
    """A uvicorn server for `app`; `before_shutdown` (blocking; run in a thread) is called when shutdown
    starts, before uvicorn waits for the open connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            if before_shutdown is not None:
                await asyncio.to_thread(before_shutdown)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    return Server(config)


@dataclass
class RunningServer:
    """A uvicorn server on a background thread; `stop()` shuts it down (lifespan included)."""

    server: object
    thread: threading.Thread
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0) -> RunningServer:
    """Start `app` on host:port (0 = a free port) in a daemon thread; return once it accepts requests."""
    sock = bind_socket(host, port)
    server = make_server(app, before_shutdown=app.state.scheduler.stop)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dspark-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise DsparkError("the server thread exited during start-up")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise DsparkError(f"the server did not start within {startup_timeout:.0f} s")
        time.sleep(0.02)
    return RunningServer(server, thread, host, sock.getsockname()[1])


def check_exposure(host: str, api_key: str | None, allow_no_key: bool) -> None:
    """A server other machines can reach needs a key, or the explicit --allow-no-key."""
    if not is_loopback(host) and api_key is None and not allow_no_key:
        raise DsparkError(f"--host {host} is reachable from other machines: pass --api-key KEY (or set "
                          "DSPARK_API_KEY), or --allow-no-key to serve it without authentication")


def serve_bundle(bundle: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, allow_no_key: bool = False, max_batch_size: int = 8,
                 device: str = "auto", dtype: str = "auto", batch_window_ms: float = 0.0, threads: int | None = None,
                 max_body_mb: float = DEFAULT_MAX_BODY_MB, log: Callable[[str], None] = print) -> None:
    """Load the bundle and serve it until interrupted (Ctrl-C, SIGTERM). threads: torch's CPU threads
    for the decoder (None: torch's default). Every argument is checked before the bundle is read."""
    from dspark.models.loading import parse_device, parse_dtype
    from dspark.serve.app import check_api_key, create_app
    from dspark.serve.runtime import runtime_from_bundle

    check_api_key(api_key)
    check_exposure(host, api_key, allow_no_key)
    parse_dtype(dtype, parse_device(device))
    set_threads(threads)
    if max_batch_size < 1:
        raise DsparkError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if batch_window_ms < 0:
        raise DsparkError(f"--batch-window-ms must be >= 0, got {batch_window_ms}")
    if not max_body_mb > 0:
        raise DsparkError(f"--max-body-mb must be > 0, got {max_body_mb:g}")
    sock = bind_socket(host, port)  # fail on a taken port before minutes of model loading
    try:
        runtime = runtime_from_bundle(bundle, device=device, dtype=dtype, log=log)
        app = create_app(runtime, api_key=api_key, max_batch_size=max_batch_size,
                         batch_window_s=batch_window_ms / 1000.0, max_body_bytes=int(max_body_mb * 2**20))
    except BaseException:
        sock.close()
        raise
    if not is_loopback(host):
        log(f"warning: listening on {host}, reachable from other machines"
            + ("" if api_key else " without authentication (--allow-no-key)"))
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log(f"serving {runtime.model_id} at http://{shown}:{actual}/v1 (draft length {runtime.policy}, "
        f"max batch {max_batch_size}{', API key required' if api_key else ''}); Ctrl-C stops")
    make_server(app, before_shutdown=app.state.scheduler.stop).run(sockets=[sock])
