"""A client-side harness for the sans-IO TCP stack, in the manner of smoltcp's socket tests.

The test plays the client's kernel.  It builds segments from a template with one field
changed (`client.segment(seq=...)`), feeds them to `Stack.receive_packet`, and parses what
the stack sends back into `TcpSegment`s.  The `syn_sent` ... `time_wait` builders drive a
connection into a given state by exchanging segments, never by touching private fields.
Time is a number the test steps; nothing sleeps.

Sequence numbers are wire numbers (32 bits).  The client's initial sequence number sits
just below 2**32, so every test that moves data also crosses the wrap-around.
"""

from __future__ import annotations

import dataclasses
import random
from ipaddress import ip_address
from typing import Any

from tun2socks.net.events import Event, FlowRequested
from tun2socks.net.ip import IpPacket
from tun2socks.net.stack import Stack, StackConfig
from tun2socks.net.tcp import ACK, FIN, SYN, TcpOptions, TcpSegment
from tun2socks.net.tcp_conn import TcpState

SEQ_MASK = 0xFFFF_FFFF
CLIENT_ISS = 0xFFFF_FF00  # the client's data crosses 2**32 after 255 bytes
CLIENT_PORT = 49152
SERVER_PORT = 80
CLIENT_MSS = 1460
CLIENT_WINDOW = 65535
RNG_SEED = 9293

# (client, server) addresses: documentation and benchmark ranges only.
ADDRESSES = {
    4: (ip_address("198.18.0.2").packed, ip_address("192.0.2.80").packed),
    6: (ip_address("fd00:7f::2").packed, ip_address("2001:db8::80").packed),
}


def wrap(seq: int) -> int:
    return seq & SEQ_MASK


def make_stack(**config: Any) -> Stack:
    """A stack with a seeded random generator (reproducible ISS) and `config` overrides."""
    return Stack(StackConfig(**config), random.Random(RNG_SEED))


def parse_packet(data: bytes, version: int = 4) -> tuple[IpPacket, TcpSegment]:
    """Parse one packet the stack sent, verifying both checksums."""
    packet = IpPacket.parse(data)
    assert packet.version == version
    segment = TcpSegment.parse(packet)
    segment.payload = bytes(segment.payload)
    return packet, segment


def check(segment: TcpSegment, **expected: Any) -> None:
    """Assert the named fields of `segment` (payload compared as bytes)."""
    for name, value in expected.items():
        actual = getattr(segment, name)
        if name == "payload":
            actual = bytes(actual)
        assert actual == value, f"{name}: {actual!r} != {value!r} in {segment}"


class Client:
    """The client end of one flow: a template segment, its sequence state, the stack's clock."""

    def __init__(
        self,
        stack: Stack | None = None,
        version: int = 4,
        *,
        port: int = CLIENT_PORT,
        iss: int = CLIENT_ISS,
        mss: int | None = CLIENT_MSS,
        wscale: int | None = None,
        window: int = CLIENT_WINDOW,
        now: float = 0.0,
    ) -> None:
        self.stack = stack if stack is not None else make_stack()
        self.version = version
        self.addr, self.server_addr = ADDRESSES[version]
        self.port = port
        self.iss = iss
        self.mss = mss
        self.wscale = wscale
        self.window = window
        self.now = now
        self.snd_nxt = iss  # the next sequence number the client sends
        self.rcv_nxt = 0  # the next sequence number the client expects (its ACK field)
        self.server_iss: int | None = None
        self.flow_id = 0

    # ------------------------------------------------------------ client -> stack

    def segment(self, **changes: Any) -> TcpSegment:
        """The template: a pure ACK at the client's current sequence state; `changes` applied."""
        template = TcpSegment(
            src_port=self.port,
            dst_port=SERVER_PORT,
            seq=self.snd_nxt,
            ack=self.rcv_nxt,
            flags=ACK,
            window=self.window,
        )
        return dataclasses.replace(template, **changes)

    def send(self, **changes: Any) -> TcpSegment:
        """Send the template with `changes`; the client's sequence state does not move."""
        segment = self.segment(**changes)
        self.send_segment(segment)
        return segment

    def send_segment(self, segment: TcpSegment) -> None:
        self.stack.receive_packet(
            segment.build(self.version, self.addr, self.server_addr), self.now
        )

    def send_data(self, data: bytes, **changes: Any) -> TcpSegment:
        """Send `data` at SND.NXT and advance it (by one more if the segment carries FIN)."""
        segment = self.send(payload=data, **changes)
        self.snd_nxt = wrap(self.snd_nxt + segment.seq_len)
        return segment

    def send_fin(self, **changes: Any) -> TcpSegment:
        return self.send_data(b"", flags=FIN | ACK, **changes)

    def send_syn(self, **changes: Any) -> TcpSegment:
        options = TcpOptions(mss=self.mss, wscale=self.wscale)
        return self.send(seq=self.iss, ack=0, flags=SYN, options=options, **changes)

    # ------------------------------------------------------------ stack -> client

    def output(self) -> list[TcpSegment]:
        """Everything the stack sends now, parsed; every packet must be addressed to us."""
        segments = []
        for data in self.stack.packets_to_send(self.now):
            packet, segment = parse_packet(data, self.version)
            assert (packet.src, packet.dst) == (self.server_addr, self.addr)
            segments.append(segment)
        return segments

    def output_one(self) -> TcpSegment:
        segments = self.output()
        assert len(segments) == 1, segments
        return segments[0]

    def absorb(self, segments: list[TcpSegment]) -> bytes:
        """Take in-order payload (and FIN) from `segments` as the client kernel would; the data."""
        data = bytearray()
        for segment in segments:
            if segment.seq == self.rcv_nxt and segment.seq_len:
                data += segment.payload
                self.rcv_nxt = wrap(self.rcv_nxt + segment.seq_len)
        return bytes(data)

    def events(self) -> list[Event]:
        events = []
        while (event := self.stack.next_event()) is not None:
            events.append(event)
        return events

    @property
    def state(self) -> TcpState | None:
        conn = self.stack.connection(self.flow_id)
        return None if conn is None else conn.state

    # ------------------------------------------------------------ time

    def run_timers(self, until: float) -> list[TcpSegment]:
        """Fire every timer due up to `until`, in order; then `now` is `until`.  The output."""
        segments: list[TcpSegment] = []
        for _ in range(10_000):
            deadline = self.stack.get_timer()
            if deadline is None or deadline > until:
                break
            self.now = max(self.now, deadline)
            self.stack.handle_timer(self.now)
            segments += self.output()
        else:
            raise AssertionError("timers did not settle")
        self.now = until
        return segments + self.output()

    def next_timer_output(self, limit: float = 10_000.0) -> list[TcpSegment]:
        """Step from deadline to deadline until a timer makes the stack send; `now` is then."""
        for _ in range(10_000):
            deadline = self.stack.get_timer()
            if deadline is None or deadline > limit:
                return []
            self.now = max(self.now, deadline)
            self.stack.handle_timer(self.now)
            segments = self.output()
            if segments:
                return segments
        raise AssertionError("timers did not settle")


# ---------------------------------------------------------------- states, reached by segments


def syn_sent(client: Client | None = None, **options: Any) -> Client:
    """The client sent SYN; the stack holds it (LISTEN, waiting for `accept`)."""
    c = client if client is not None else Client(**options)
    c.send_syn()
    events = c.events()
    assert len(events) == 1 and isinstance(events[0], FlowRequested), events
    c.flow_id = events[0].flow_id
    c.snd_nxt = wrap(c.iss + 1)
    assert c.state is TcpState.LISTEN
    return c


def syn_received(client: Client | None = None, **options: Any) -> Client:
    """The stack accepted and sent SYN-ACK; the client has it but has not ACKed."""
    c = syn_sent(client, **options)
    c.stack.accept(c.flow_id, c.now)
    syn_ack = c.output_one()
    check(syn_ack, flags=SYN | ACK, ack=c.snd_nxt)
    c.server_iss = syn_ack.seq
    c.rcv_nxt = wrap(syn_ack.seq + 1)
    assert c.state is TcpState.SYN_RECEIVED
    return c


def established(client: Client | None = None, **options: Any) -> Client:
    c = syn_received(client, **options)
    c.send()
    assert c.output() == []
    assert c.events() == []
    assert c.state is TcpState.ESTABLISHED
    return c


def close_wait(client: Client | None = None, **options: Any) -> Client:
    """The client sent FIN and the stack ACKed it."""
    return _client_fin_acked(established(client, **options), TcpState.CLOSE_WAIT)


def last_ack(client: Client | None = None, **options: Any) -> Client:
    """CLOSE-WAIT, then `shutdown`: the client has our FIN but has not ACKed it."""
    return _our_fin_unacked(close_wait(client, **options), TcpState.LAST_ACK)


def fin_wait_1(client: Client | None = None, **options: Any) -> Client:
    """`shutdown` in ESTABLISHED: the client has our FIN but has not ACKed it."""
    return _our_fin_unacked(established(client, **options), TcpState.FIN_WAIT_1)


def fin_wait_2(client: Client | None = None, **options: Any) -> Client:
    c = fin_wait_1(client, **options)
    c.send()
    assert c.output() == []
    assert c.state is TcpState.FIN_WAIT_2
    return c


def time_wait(client: Client | None = None, **options: Any) -> Client:
    """FIN-WAIT-2, then the client's FIN: ACKed, both directions closed."""
    return _client_fin_acked(fin_wait_2(client, **options), TcpState.TIME_WAIT)


def _client_fin_acked(c: Client, then: TcpState) -> Client:
    """The client sends FIN; the stack ACKs it and is in `then`."""
    c.send_fin()
    check(c.output_one(), flags=ACK, ack=c.snd_nxt)
    c.events()
    assert c.state is then
    return c


def _our_fin_unacked(c: Client, then: TcpState) -> Client:
    """`shutdown`: the stack sends FIN, which the client takes but does not ACK; in `then`."""
    c.stack.shutdown(c.flow_id)
    fin = c.output_one()
    check(fin, flags=FIN | ACK, seq=c.rcv_nxt)
    c.absorb([fin])
    assert c.state is then
    return c
