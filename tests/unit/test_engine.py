"""The engine with its parts given to its constructor, on a real event loop, with a device
that records what the engine writes (a TUN needs root; the integration tests use one).

What is checked: a refused upstream is counted under the failure's own `kind` (one set of
labels: the SOCKS5 error classes', shown as `upstream_errors` by the API and metrics) and
answered with RST (RFC 9293 3.10.7.2); UDP is handed to the handler of its destination
port or the default one; a handler's refusal reaches the TUN through the `DatagramPort`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from ipaddress import ip_address

import pytest

from tun2socks.device import DeviceStats
from tun2socks.engine import Collaborators, DatagramPort, Engine
from tun2socks.net.events import DatagramReceived, FlowRequested
from tun2socks.net.ip import PROTO_ICMP, PROTO_TCP, IpPacket
from tun2socks.net.stack import Stack, StackConfig
from tun2socks.net.tcp import RST, SYN, TcpSegment
from tun2socks.net.udp import UdpDatagram
from tun2socks.observe import snapshot
from tun2socks.outbound.dialer import DialError
from tun2socks.outbound.socks5 import (
    Socks5AuthFailed,
    Socks5ProtocolError,
    Socks5ProxyUnreachable,
    Socks5ReplyError,
    Socks5Timeout,
)

CLIENT = ip_address("198.18.0.2")
SERVER = ip_address("192.0.2.80")
PROXY = "127.0.0.1:1080"


class RecordingDevice:
    """Stands in for TunDevice: records the packets the engine writes."""

    mtu = 1500
    offload = False

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.stats = DeviceStats()
        self.on_packets: Callable[[list[tuple[bytes, bool]]], None] | None = None

    def start(self, loop: object, on_packets: Callable[[list[tuple[bytes, bool]]], None]) -> None:
        self.on_packets = on_packets

    def write(self, packets: list[bytes]) -> None:
        self.written.extend(packets)

    def drain(self) -> None:
        pass  # written at once: nothing is held


class FailingDialer:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def dial(self, flow: FlowRequested) -> socket.socket:
        raise self.error


class Recorder:
    def __init__(self) -> None:
        self.datagrams: list[DatagramReceived] = []

    def datagram_received(self, datagram: DatagramReceived) -> None:
        self.datagrams.append(datagram)


def make_engine(
    parts: Callable[[DatagramPort], Collaborators],
) -> tuple[Engine, RecordingDevice, DatagramPort]:
    loop = asyncio.get_running_loop()
    stack = Stack(StackConfig())
    port = DatagramPort(stack, loop)
    device = RecordingDevice()
    engine = Engine(stack, device, loop, port, parts(port))  # type: ignore[arg-type]
    engine.start()
    return engine, device, port


def syn(dst_port: int = 80) -> bytes:
    return TcpSegment(49152, dst_port, 1000, 0, SYN, 65535).build(4, CLIENT.packed, SERVER.packed)


def udp(dst_port: int, payload: bytes = b"q") -> bytes:
    return UdpDatagram(5353, dst_port, payload).build(4, CLIENT.packed, SERVER.packed)


async def settle() -> None:
    for _ in range(5):  # a few loop iterations: the dial task, then the flush
        await asyncio.sleep(0)


SOCKS_ARGS = ("why", PROXY, "192.0.2.80:80")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (Socks5ReplyError(*SOCKS_ARGS, "CONNECT", 5), "connection_refused"),
        (Socks5ReplyError(*SOCKS_ARGS, "CONNECT", 2), "connection_not_allowed"),
        (Socks5ReplyError(*SOCKS_ARGS, "CONNECT", 0x42), "reply_66"),  # unassigned REP
        (Socks5AuthFailed(*SOCKS_ARGS), "auth_failed"),
        (Socks5ProxyUnreachable(*SOCKS_ARGS), "proxy_unreachable"),
        (Socks5Timeout(*SOCKS_ARGS), "timeout"),
        (Socks5ProtocolError(*SOCKS_ARGS), "protocol_error"),
        (DialError("blocked by rule 1"), "dial_failed"),
        (OSError("no route"), "connect_failed"),
    ],
)
def test_refused_upstream_is_counted_under_its_kind_and_answered_with_rst(
    error: Exception, kind: str
) -> None:
    async def scenario() -> None:
        engine, device, _port = make_engine(
            lambda port: Collaborators(FailingDialer(error), Recorder(), proxy_address=PROXY)
        )
        assert device.on_packets is not None
        device.on_packets([(syn(), False)])
        await settle()
        stats = snapshot.stats(engine, uptime=0.0)
        assert stats["upstream_errors"] == {kind: 1}
        assert engine.relays == {}
        [reply] = device.written
        packet = IpPacket.parse(reply)
        assert packet.protocol == PROTO_TCP
        assert TcpSegment.parse(packet).flags & RST
        engine.close()

    asyncio.run(scenario())


def test_udp_goes_to_the_handler_of_its_port_else_to_the_default() -> None:
    async def scenario() -> None:
        dns, other = Recorder(), Recorder()
        engine, device, _port = make_engine(
            lambda port: Collaborators(FailingDialer(DialError("x")), other, {53: dns})
        )
        assert device.on_packets is not None
        device.on_packets([(udp(53), False), (udp(443), False), (udp(53), False)])
        assert [d.dst_port for d in dns.datagrams] == [53, 53]
        assert [d.dst_port for d in other.datagrams] == [443]
        engine.close()

    asyncio.run(scenario())


def test_a_refusal_through_the_datagram_port_reaches_the_tun() -> None:
    # A handler refuses on its own time (not inside the engine's event handling): the port
    # wakes the engine, which writes the ICMP port unreachable (RFC 792) in this iteration.
    async def scenario() -> None:
        handler = Recorder()
        engine, device, port = make_engine(
            lambda port: Collaborators(FailingDialer(DialError("x")), handler)
        )
        assert device.on_packets is not None
        device.on_packets([(udp(443), False)])
        assert device.written == []
        port.refuse_datagram(handler.datagrams[0])
        await settle()
        [reply] = device.written
        assert IpPacket.parse(reply).protocol == PROTO_ICMP
        engine.close()

    asyncio.run(scenario())
