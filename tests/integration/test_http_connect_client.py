"""The asyncio HTTP CONNECT client (outbound/http_connect.py) against small servers on loopback
that do what tinyproxy never does: send the destination's first bytes with the 200, refuse with
other statuses, answer garbage or nothing. Real sockets; every test bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from tests.support.bounded_run import run_bounded
from tun2socks.outbound.http_connect import (
    HttpProxyAuthFailed,
    HttpProxyProtocolError,
    HttpProxyRefused,
    HttpProxyTimeout,
    HttpProxyUnreachable,
    connect,
)
from tun2socks.outbound.socks5 import ProxyEndpoint

pytestmark = pytest.mark.integration

BOUND_S = 20.0  # each test body, at the most
T = TypeVar("T")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _with_server(handler: Handler, body: Callable[[int], Awaitable[T]]) -> T:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await body(port)
    finally:
        server.close()
        await server.wait_closed()


def _answering(answer: bytes, seen: list[bytes] | None = None) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(head)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    return handler


def test_rfc9110_9_3_6_bytes_after_the_200_stay_for_the_relay() -> None:
    seen: list[bytes] = []
    handler = _answering(b"HTTP/1.1 200 Connection established\r\n\r\nSSH-2.0-server\r\n", seen)

    async def body(port: int) -> bytes:
        proxy = ProxyEndpoint("127.0.0.1", port, "al", "pw", scheme="http")
        sock = await connect(proxy, "fd00::9", 22, timeout=5)
        with sock:
            loop = asyncio.get_running_loop()
            return await loop.sock_recv(sock, 100)

    assert run_bounded(_with_server(handler, body), BOUND_S) == b"SSH-2.0-server\r\n"
    assert seen[0].startswith(b"CONNECT [fd00::9]:22 HTTP/1.1\r\nHost: [fd00::9]:22\r\n")
    assert b"Proxy-Authorization: Basic YWw6cHc=\r\n" in seen[0]


@pytest.mark.parametrize(
    ("answer", "error", "text"),
    [
        (
            b"HTTP/1.1 403 Forbidden\r\n\r\n",
            HttpProxyRefused,
            "refused by the proxy: 403 Forbidden",
        ),
        (b"HTTP/1.0 502 Bad Gateway\r\nX: y\r\n\r\n", HttpProxyRefused, "502 Bad Gateway"),
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", HttpProxyAuthFailed, "407"),
        (b"\x05\x00", HttpProxyProtocolError, "closed the connection"),
        (b"\x05\x00\x00\x01\x7f\x00", HttpProxyProtocolError, "not HTTP"),
    ],
)
def test_each_failure_is_one_clear_error(answer: bytes, error: type[Exception], text: str) -> None:
    async def body(port: int) -> None:
        proxy = ProxyEndpoint("127.0.0.1", port, "al", "secret-pw", scheme="http")
        with pytest.raises(error) as info:
            await connect(proxy, "198.19.0.10", 80, timeout=5)
        message = str(info.value)
        assert message.startswith(f"HTTP proxy 127.0.0.1:{port}: CONNECT 198.19.0.10:80 failed")
        assert text in message and "secret-pw" not in message and "\n" not in message

    run_bounded(_with_server(_answering(answer), body), BOUND_S)


def test_silent_proxy_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3)
        writer.close()

    async def body(port: int) -> None:
        with pytest.raises(HttpProxyTimeout, match="waiting for the CONNECT answer"):
            await connect(ProxyEndpoint("127.0.0.1", port, scheme="http"), "h", 80, timeout=0.5)

    run_bounded(_with_server(silent, body), BOUND_S)


def test_closed_port_is_unreachable() -> None:
    async def body() -> None:
        async def nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(nothing, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(HttpProxyUnreachable, match="Connection refused"):
            await connect(ProxyEndpoint("127.0.0.1", port, scheme="http"), "h", 80, timeout=5)

    run_bounded(body(), BOUND_S)
