"""The engine with its parts given to its constructor, on a real event loop, with a device
that records what the engine writes (a TUN needs root; the integration tests use one).

What is checked: a refused upstream is counted under the failure's own `kind` (one set of
labels: the SOCKS5 error classes', shown as `upstream_errors` by the API and metrics) and
answered with RST (RFC 9293 3.10.7.2); UDP is handed to the handler of its destination
port or the default one; a handler's refusal reaches the TUN through the `DatagramPort`.
With ``proxy.early_accept`` (`KnownDestinations`), a destination that connected moments ago
gets its SYN-ACK before its dial ends, the client's data waits for the upstream, and a dial
that fails then resets the flow; any other keeps the SYN-ACK-after-connect rule.
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
from tun2socks.net.tcp import ACK, PSH, RST, SYN, TcpSegment
from tun2socks.net.udp import UdpDatagram
from tun2socks.observe import snapshot
from tun2socks.outbound.dialer import DialError, FirstDataOffer
from tun2socks.outbound.known_destinations import KnownDestinations
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

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
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


# ---------------------------------------------------------------- proxy.early_accept


class HeldDialer:
    """Each dial waits until the test settles it with a socket or an error."""

    def __init__(self) -> None:
        self.pending: list[asyncio.Future[socket.socket]] = []

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        future: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        return await future


def segments(device: RecordingDevice) -> list[TcpSegment]:
    found = [TcpSegment.parse(IpPacket.parse(p)) for p in device.written]
    device.written.clear()
    return found


def client_segment(syn_ack: TcpSegment, payload: bytes, src_port: int = 49152) -> bytes:
    return TcpSegment(src_port, 80, 1001, syn_ack.seq + 1, ACK | PSH, 65535, payload).build(
        4, CLIENT.packed, SERVER.packed
    )


def early_engine() -> tuple[Engine, RecordingDevice, HeldDialer, KnownDestinations]:
    dialer, known = HeldDialer(), KnownDestinations(ttl=60.0)
    engine, device, _port = make_engine(
        lambda port: Collaborators(dialer, Recorder(), known_destinations=known)
    )
    return engine, device, dialer, known


async def connect_once(
    device: RecordingDevice, dialer: HeldDialer, src_port: int
) -> tuple[socket.socket, TcpSegment]:
    """One flow to SERVER:80 dialed to the end; the far end of its upstream, its SYN-ACK."""
    assert device.on_packets is not None
    device.on_packets([(syn_from(src_port), False)])
    await settle()
    ours, far = socket.socketpair()
    ours.setblocking(False)
    dialer.pending[-1].set_result(ours)
    await settle()
    [syn_ack] = segments(device)
    return far, syn_ack


def syn_from(src_port: int) -> bytes:
    return TcpSegment(src_port, 80, 1000, 0, SYN, 65535).build(4, CLIENT.packed, SERVER.packed)


def test_an_unknown_destination_gets_its_syn_ack_only_after_its_upstream_connected() -> None:
    async def scenario() -> None:
        engine, device, dialer, known = early_engine()
        assert device.on_packets is not None
        device.on_packets([(syn(), False)])
        await settle()
        assert device.written == []  # the dial is not done: no SYN-ACK yet
        ours, far = socket.socketpair()
        ours.setblocking(False)
        dialer.pending[0].set_result(ours)
        await settle()
        [syn_ack] = segments(device)
        assert syn_ack.flags == SYN | ACK
        assert known.is_known((SERVER, 80), engine.loop.time())
        assert known.counters.accepted == 0
        engine.close()
        far.close()

    asyncio.run(scenario())


def test_a_known_destination_gets_its_syn_ack_at_once_and_its_data_waits_for_upstream() -> None:
    async def scenario() -> None:
        engine, device, dialer, _known = early_engine()
        first_far, _ = await connect_once(device, dialer, 40000)
        assert device.on_packets is not None
        device.on_packets([(syn_from(40001), False)])
        await settle()
        [syn_ack] = segments(device)  # before the second dial has ended
        assert syn_ack.flags == SYN | ACK
        assert len(dialer.pending) == 2 and not dialer.pending[1].done()
        device.on_packets([(client_segment(syn_ack, b"GET / HTTP/1.0\r\n\r\n", 40001), False)])
        await settle()
        ours, far = socket.socketpair()
        ours.setblocking(False)
        dialer.pending[1].set_result(ours)
        await settle()
        far.settimeout(2.0)
        assert far.recv(100) == b"GET / HTTP/1.0\r\n\r\n"  # held in the stack, then sent
        stats = engine.stats_sources["early_accept"]()
        assert {k: stats[k] for k in ("known", "accepted", "reset", "pipelined")} == {
            "known": 1,
            "accepted": 1,
            "reset": 0,
            "pipelined": 0,  # this dialer knows of no offer: the reply was read before
        }
        engine.close()
        far.close()
        first_far.close()

    asyncio.run(scenario())


def test_a_dial_failing_after_an_early_syn_ack_resets_the_flow_and_forgets_it() -> None:
    # RFC 9293 3.10.7.2/3.10.7.4: a connection that cannot go on is reset; here the client
    # has its SYN-ACK already, so it sees the RST of an established connection.
    async def scenario() -> None:
        engine, device, dialer, known = early_engine()
        first_far, _ = await connect_once(device, dialer, 40000)
        assert device.on_packets is not None
        device.on_packets([(syn_from(40001), False)])
        await settle()
        [syn_ack] = segments(device)
        device.on_packets([(client_segment(syn_ack, b"data", 40001), False)])
        await settle()
        segments(device)  # the ACK of the data, if any
        dialer.pending[1].set_exception(Socks5ReplyError(*SOCKS_ARGS, "CONNECT", 5))
        await settle()
        [reset] = segments(device)
        assert reset.flags & RST
        assert dict(engine.upstream_errors) == {"connection_refused": 1}
        assert 40001 not in [r.flow.src_port for r in engine.relays.values()]
        assert known.stats()["known"] == 0
        assert (known.counters.accepted, known.counters.reset) == (1, 1)
        device.on_packets([(syn_from(40002), False)])  # unknown again: waits for its dial
        await settle()
        assert device.written == []
        engine.close()
        first_far.close()

    asyncio.run(scenario())
