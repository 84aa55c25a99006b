"""The SOCKS5 UDP ASSOCIATE client against a real Dante server on loopback, and against a small
server written here for what Dante does not show on demand (closing the control connection,
SOCKS-level fragments, an all-zeros relay address)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.integration.helpers_danted import (
    DantedProcess,
    danted_skip_reason,
    free_tcp_port,
    loopback_config,
    start_danted,
)
from tests.support.bounded_run import run_bounded
from tun2socks.outbound.socks5 import ProxyEndpoint, Socks5ProxyUnreachable, Socks5ReplyError
from tun2socks.outbound.socks5_udp import DatagramTooLarge, UdpAssociation, associate
from tun2socks.outbound.socks5_wire import (
    ReplyCode,
    build_reply,
    build_udp_datagram,
    parse_address,
)

pytestmark = pytest.mark.integration

LOCALHOST = "127.0.0.1"


def _danted(tmp_path: Path, commands: str) -> Iterator[DantedProcess]:
    reason = danted_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    port = free_tcp_port()
    config = loopback_config(port, logoutput=tmp_path / "danted.log", commands=commands)
    server = start_danted("udp.connectdst: no\n" + config, tmp_path, host=LOCALHOST, port=port)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def danted_udp(tmp_path: Path) -> Iterator[DantedProcess]:
    yield from _danted(tmp_path, "connect udpassociate udpreply")


@pytest.fixture
def danted_tcp_only(tmp_path: Path) -> Iterator[DantedProcess]:
    yield from _danted(tmp_path, "connect")


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def _collect(assoc: UdpAssociation) -> asyncio.Queue[tuple[str, int, bytes]]:
    queue: asyncio.Queue[tuple[str, int, bytes]] = asyncio.Queue()
    assoc.on_datagram = lambda host, port, data: queue.put_nowait((host, port, data))
    return queue


def test_datagrams_up_to_60_kb_echo_through_danted(danted_udp: DantedProcess) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(LOCALHOST, 0))
        echo_port = echo.get_extra_info("sockname")[1]
        assoc = await associate(ProxyEndpoint(LOCALHOST, danted_udp.port), timeout=10)
        replies = await _collect(assoc)
        try:
            for size in (1, 1400, 8192, 60000):  # (Dante relays no empty datagram)
                payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
                assert assoc.send(LOCALHOST, echo_port, payload)
                assert await asyncio.wait_for(replies.get(), 5) == (LOCALHOST, echo_port, payload)
            assert (assoc.sent, assoc.received, assoc.dropped) == (4, 4, 0)
        finally:
            assoc.close()
            echo.close()
        assert await assoc.wait_closed() == "closed by us"
        assert not assoc.send(LOCALHOST, echo_port, b"late")  # dropped, not raised

    run_bounded(body())


def test_payload_too_large_for_one_relay_datagram_raises(danted_udp: DantedProcess) -> None:
    async def body() -> None:
        assoc = await associate(ProxyEndpoint(LOCALHOST, danted_udp.port), timeout=10)
        try:
            limit = assoc.max_payload(LOCALHOST)
            assert limit == 65507 - 10
            with pytest.raises(DatagramTooLarge) as info:
                assoc.send(LOCALHOST, 9, bytes(limit + 1))
            assert info.value.max_payload == limit
        finally:
            assoc.close()

    run_bounded(body())


def test_proxy_refusing_udp_associate_raises_reply_error(danted_tcp_only: DantedProcess) -> None:
    async def body() -> None:
        with pytest.raises(Socks5ReplyError) as info:
            await associate(ProxyEndpoint(LOCALHOST, danted_tcp_only.port), timeout=10)
        assert info.value.reply_code == ReplyCode.CONNECTION_NOT_ALLOWED
        assert "UDP ASSOCIATE" in str(info.value)

    run_bounded(body())


class _FakeProxy:
    """Accepts one UDP ASSOCIATE (no auth), answers with an all-zeros relay address, and lets
    the test send datagrams from its relay socket and close the control connection."""

    def __init__(self) -> None:
        self.relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.relay.bind((LOCALHOST, 0))
        self.client_udp: tuple[str, int] | None = None
        self.control: asyncio.StreamWriter | None = None
        self.ready = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(3) == b"\x05\x01\x00"
        writer.write(b"\x05\x00")
        header = await reader.readexactly(3)
        assert header == b"\x05\x03\x00"
        rest = await reader.readexactly(7)  # ATYP 1, four address bytes, port
        host, port, _ = parse_address(rest)  # type: ignore[misc]
        self.client_udp = (host, port)
        writer.write(build_reply(0, "0.0.0.0", self.relay.getsockname()[1]))
        self.control = writer
        self.ready.set()

    def send(self, datagram: bytes) -> None:
        assert self.client_udp is not None
        self.relay.sendto(datagram, self.client_udp)


def test_fake_proxy_relay_rules_and_control_connection_close() -> None:
    async def body() -> None:
        fake = _FakeProxy()
        server = await asyncio.start_server(fake.handle, LOCALHOST, 0)
        port = server.sockets[0].getsockname()[1]
        closed: list[str] = []
        try:
            assoc = await associate(
                ProxyEndpoint(LOCALHOST, port), timeout=10, on_close=closed.append
            )
            replies = await _collect(assoc)
            await fake.ready.wait()
            # The request named our real UDP endpoint, and BND 0.0.0.0 meant the proxy's host.
            assert fake.client_udp is not None and fake.client_udp[0] == LOCALHOST
            assert assoc.relay == (LOCALHOST, fake.relay.getsockname()[1])
            # A SOCKS-level fragment (FRAG 1) is dropped; the next datagram gets through.
            fragment = bytearray(build_udp_datagram("192.0.2.1", 53, b"frag"))
            fragment[2] = 1
            fake.send(bytes(fragment))
            fake.send(build_udp_datagram("192.0.2.1", 53, b"whole"))
            assert await asyncio.wait_for(replies.get(), 5) == ("192.0.2.1", 53, b"whole")
            assert assoc.dropped == 1
            # The proxy closes the control connection: the association ends with it.
            assert fake.control is not None
            fake.control.close()
            reason = await asyncio.wait_for(assoc.wait_closed(), 5)
            assert closed == [reason] and "control connection" in reason
            assert assoc.closed and not assoc.send("192.0.2.1", 53, b"after")
        finally:
            server.close()
            fake.relay.close()

    run_bounded(body())


def test_unreachable_proxy_fails_fast() -> None:
    async def body() -> None:
        port = free_tcp_port()
        with pytest.raises(Socks5ProxyUnreachable) as info:
            await associate(ProxyEndpoint(LOCALHOST, port), timeout=5)
        assert "cannot reach proxy" in str(info.value)

    run_bounded(body())
