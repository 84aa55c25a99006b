"""The client's first data right behind the CONNECT (``proxy.early_accept`` on a ready pooled
session): the engine with a dialer that answers a dial with an offer with a socket pair
whose far end plays the proxy, on a real event loop (``test_engine.py``'s device and helpers).

What is checked: the client's data goes to the proxy before any reply; the reply (RFC 1928
section 6) is taken off the stream and only what follows it reaches the client; a failure
reply, a timeout, or a session that dies after the client's data went out resets the flow
(RFC 9293 3.10.7.4: the client had its SYN-ACK) and forgets the destination; a session that
dies before any client data went out is dialed afresh, unseen; no other dial sees the offer.
"""

from __future__ import annotations

import asyncio
import socket

from tests.unit.test_engine import (
    SERVER,
    Recorder,
    RecordingDevice,
    client_segment,
    make_engine,
    segments,
    settle,
    syn_from,
)
from tun2socks.engine import Collaborators, Engine
from tun2socks.net.events import FlowRequested
from tun2socks.net.tcp import ACK, RST, SYN, TcpSegment
from tun2socks.outbound.dialer import FirstDataOffer, PendingConnect
from tun2socks.outbound.known_destinations import KnownDestinations
from tun2socks.outbound.socks5_wire import ReplyCode, build_reply

PROXY = "127.0.0.1:1080"
REQUEST = b"GET / HTTP/1.0\r\n\r\n"
ANSWER = b"HTTP/1.0 200 OK\r\n\r\nhello"
SUCCESS = build_reply(ReplyCode.SUCCEEDED, "127.0.0.1", 40000)


class OfferingDialer:
    """Dials with a socket pair at once; under an offer, as a pooled session whose CONNECT
    reply is still due. `fars` are the proxy ends, `offered` whether each dial saw an offer."""

    def __init__(self, reply_timeout: float = 10.0) -> None:
        self.fars: list[socket.socket] = []
        self.offered: list[bool] = []
        self.sessions_lost = 0
        self.reply_timeout = reply_timeout

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        ours, far = socket.socketpair()
        ours.setblocking(False)
        far.settimeout(2.0)
        self.fars.append(far)
        self.offered.append(offer is not None)
        if offer is not None:
            target = f"{flow.dst}:{flow.dst_port}"
            offer.pending = PendingConnect(PROXY, target, self.reply_timeout, self.lost)
        return ours

    def lost(self) -> None:
        self.sessions_lost += 1


async def early_flow(
    reply_timeout: float = 10.0,
) -> tuple[Engine, RecordingDevice, OfferingDialer, KnownDestinations, int]:
    """An engine whose destination SERVER:80 is known (one flow dialed to the end); then a
    second flow from port 40001, accepted early and dialed under an offer. Returns the engine,
    its device, the dialer, the table and the SYN-ACK's sequence number."""
    dialer, known = OfferingDialer(reply_timeout), KnownDestinations(ttl=60.0)
    engine, device, _port = make_engine(
        lambda port: Collaborators(dialer, Recorder(), known_destinations=known)
    )
    assert device.on_packets is not None
    device.on_packets([(syn_from(40000), False)])
    await settle()
    segments(device)
    device.on_packets([(syn_from(40001), False)])
    await settle()
    [syn_ack] = segments(device)
    assert syn_ack.flags == SYN | ACK
    assert dialer.offered == [False, True]  # only the early flow's dial was offered
    return engine, device, dialer, known, syn_ack.seq


def send_request(device: RecordingDevice, seq: int) -> None:
    syn_ack = TcpSegment(80, 40001, seq, 1001, SYN | ACK, 65535)
    assert device.on_packets is not None
    device.on_packets([(client_segment(syn_ack, REQUEST, 40001), False)])


def payload_to_client(device: RecordingDevice) -> bytes:
    return b"".join(s.payload for s in segments(device) if s.dst_port == 40001)


def test_rfc1928_s6_reply_is_split_off_and_only_the_data_after_it_reaches_the_client() -> None:
    async def scenario() -> None:
        engine, device, dialer, known, seq = await early_flow()
        send_request(device, seq)
        await settle()
        far = dialer.fars[1]
        assert far.recv(100) == REQUEST  # on its way before any reply
        segments(device)
        far.sendall(SUCCESS + ANSWER)  # the reply and the destination's first bytes together
        await settle()
        assert payload_to_client(device) == ANSWER
        stats = known.stats()
        assert (stats["pipelined"], stats["pipelined_first_data"], stats["reset"]) == (1, 1, 0)
        engine.close()

    asyncio.run(scenario())


def test_rfc1928_s6_reply_in_pieces_lets_nothing_of_it_through() -> None:
    async def scenario() -> None:
        engine, device, dialer, _known, seq = await early_flow()
        send_request(device, seq)
        await settle()
        far = dialer.fars[1]
        far.recv(100)
        segments(device)
        for piece in (SUCCESS[:3], SUCCESS[3:7], SUCCESS[7:] + ANSWER[:4], ANSWER[4:]):
            far.sendall(piece)
            await settle()
        assert payload_to_client(device) == ANSWER
        engine.close()

    asyncio.run(scenario())


def test_rfc1928_s6_failure_reply_resets_the_flow_and_forgets_the_destination() -> None:
    async def scenario() -> None:
        engine, device, dialer, known, seq = await early_flow()
        send_request(device, seq)
        await settle()
        segments(device)
        dialer.fars[1].sendall(build_reply(ReplyCode.CONNECTION_REFUSED, "0.0.0.0", 0))
        await settle()
        [reset] = [s for s in segments(device) if s.dst_port == 40001]
        assert reset.flags & RST
        assert dict(engine.upstream_errors) == {"connection_refused": 1}
        assert not known.is_known((SERVER, 80), engine.loop.time())
        assert (known.counters.reset, known.counters.pipelined_first_data) == (1, 0)
        assert 40001 not in [r.flow.src_port for r in engine.relays.values()]
        engine.close()

    asyncio.run(scenario())


def test_a_session_dead_before_any_client_data_is_dialed_afresh_unseen() -> None:
    async def scenario() -> None:
        engine, device, dialer, known, seq = await early_flow()
        dialer.fars[1].close()  # the proxy had closed the session: EOF, no reply byte
        await settle()
        assert dialer.offered == [False, True, False]  # dialed again, the whole way
        assert dialer.sessions_lost == 1
        send_request(device, seq)
        await settle()
        assert dialer.fars[2].recv(100) == REQUEST
        dialer.fars[2].sendall(ANSWER)  # a fresh dial's reply was read by the dialer
        await settle()
        assert payload_to_client(device) == ANSWER  # no RST among them
        assert (known.counters.pipelined_redialed, known.counters.reset) == (1, 0)
        assert engine.upstream_errors == {}
        engine.close()

    asyncio.run(scenario())


def test_a_session_dead_after_the_client_data_went_out_resets_the_flow() -> None:
    # The request may have reached the proxy: sent again on a fresh connection it could
    # arrive twice, so the client is told (RST) instead.
    async def scenario() -> None:
        engine, device, dialer, known, seq = await early_flow()
        send_request(device, seq)
        await settle()
        far = dialer.fars[1]
        assert far.recv(100) == REQUEST
        segments(device)
        far.close()
        await settle()
        assert any(s.flags & RST for s in segments(device) if s.dst_port == 40001)
        assert dialer.offered == [False, True]  # not dialed again
        assert dict(engine.upstream_errors) == {"protocol_error": 1}
        assert (known.counters.reset, known.counters.pipelined_redialed) == (1, 0)
        engine.close()

    asyncio.run(scenario())


def test_a_reply_that_never_comes_resets_the_flow_after_the_timeout() -> None:
    async def scenario() -> None:
        engine, device, dialer, known, seq = await early_flow(reply_timeout=0.05)
        send_request(device, seq)
        await settle()
        segments(device)
        await asyncio.sleep(0.2)
        await settle()
        assert any(s.flags & RST for s in segments(device) if s.dst_port == 40001)
        assert dict(engine.upstream_errors) == {"timeout": 1}
        assert not known.is_known((SERVER, 80), engine.loop.time())
        engine.close()
        dialer.fars[1].close()

    asyncio.run(scenario())
