"""The listening socket: what asyncio (and so uvicorn) does with the connections it accepts."""

from __future__ import annotations

import asyncio
import socket

import pytest

from dspark.errors import DsparkError
from dspark.serve.runner import bind_socket


def test_accepted_connections_get_tcp_nodelay():
    """asyncio turns Nagle off only on connections of a listening socket whose proto is TCP; with
    proto 0 every keep-alive response waited ~40 ms for the client's delayed ACK."""
    sock = bind_socket("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    port = sock.getsockname()[1]
    seen: list[int] = []

    async def main() -> None:
        def on_connect(reader, writer) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        async with server:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            w.close()

    asyncio.run(main())
    assert seen and seen[0] != 0


def test_bad_port_and_taken_port_fail_in_one_line():
    with pytest.raises(DsparkError, match="--port must be in 0..65535, got 70000"):
        bind_socket("127.0.0.1", 70000)
    taken = bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(DsparkError, match="cannot listen on 127.0.0.1:"):
            bind_socket("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_exposure_and_api_key_rules():
    from dspark.serve.app import check_api_key
    from dspark.serve.runner import check_exposure, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.com"))
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "k", False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(DsparkError, match="--allow-no-key"):
        check_exposure("::", None, False)
    for key in ("s3cret", "sk-A_b.c~d/e+f="):
        check_api_key(key)
    for key, needle in [("", "must not be empty"), ("  ", "must not be empty"), ("k ", "trailing whitespace"),
                        ("\tk", "leading or trailing"), ("a b", "character 2 of 3"), ("clé", "character 3 of 3")]:
        with pytest.raises(DsparkError, match=needle):
            check_api_key(key)
