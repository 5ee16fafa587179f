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
