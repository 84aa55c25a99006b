"""The stack: IP packets in, IP packets and events out (sans-IO).

Theory of operation
-------------------
The layer above drives it like aioquic's connection:

    stack.receive_packet(data, now)        # for each packet read from the TUN
    packets = stack.packets_to_send(now)   # once per batch: one ACK per flow per batch
    while (event := stack.next_event()):   # FlowRequested, DataReceived, ...
        ...
    timer = stack.get_timer()              # arm one timer; on expiry: handle_timer(now)

TCP flows are found by their 4-tuple.  A SYN creates a flow and a `FlowRequested` event;
nothing is answered until `accept` (SYN-ACK) or `reject` (RST).  Caps on flows and on
half-open flows answer extra SYNs with RST, so a SYN flood cannot grow memory.

Bad input never raises: a packet that does not parse is counted in `drops` by reason.
Protocols the stack does not carry yet are counted as dropped too.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
from collections import Counter, deque
from dataclasses import dataclass

from tun2socks.net.events import DatagramReceived, Event, FlowRequested, IPAddress
from tun2socks.net.ip import (
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IpPacket,
    MalformedPacket,
)
from tun2socks.net.tcp import ACK, FIN, RST, SYN, TCP_HEADER_LEN, TcpSegment
from tun2socks.net.tcp_conn import TcpConfig, TcpConnection, TcpState
from tun2socks.net.udp import UdpDatagram

FourTuple = tuple[bytes, int, bytes, int]  # client address, client port, server address, port

IPV4_MAX_PAYLOAD = 0xFFFF - IPV4_HEADER_LEN - TCP_HEADER_LEN


@dataclass(frozen=True, slots=True)
class StackConfig:
    mtu: int = 1500
    offload: bool = False  # the device does checksums and segmentation (TSO)
    recv_buffer: int = 256 * 1024
    send_buffer: int = 256 * 1024
    max_flows: int = 10_000
    max_half_open: int = 1_000
    idle_timeout: float = 600.0
    time_wait: float = 2.0

    def tcp_config(self, version: int) -> TcpConfig:
        ip_header = IPV4_HEADER_LEN if version == 4 else IPV6_HEADER_LEN
        mss = self.mtu - ip_header - TCP_HEADER_LEN
        # With TSO, send super-segments that the kernel cuts at the MSS: a whole number of
        # MSS-sized segments so that every segment on the wire is full.
        max_segment = (IPV4_MAX_PAYLOAD // mss) * mss if self.offload else None
        return TcpConfig(
            mss=mss,
            recv_buffer=self.recv_buffer,
            send_buffer=self.send_buffer,
            max_segment=max_segment,
            offload=self.offload,
            idle_timeout=self.idle_timeout,
            time_wait=self.time_wait,
        )


class Stack:
    def __init__(self, config: StackConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._tcp_config = {4: config.tcp_config(4), 6: config.tcp_config(6)}
        self._rng = rng or random.Random()
        self._flows: dict[FourTuple, TcpConnection] = {}
        self._by_id: dict[int, TcpConnection] = {}
        self._keys: dict[int, FourTuple] = {}
        self._half_open: set[int] = set()
        self._dirty: dict[int, TcpConnection] = {}
        self._timers: list[tuple[float, int]] = []
        self._scheduled: dict[int, float] = {}
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._next_id = 1
        self.drops: Counter[str] = Counter()
        self.packets_in = 0
        self.flows_total = 0

    # ---------------------------------------------------------------- driving

    def receive_packet(
        self, data: bytes | memoryview, now: float, checksum_trusted: bool = False
    ) -> None:
        """Process one IP packet read from the TUN."""
        self.packets_in += 1
        try:
            packet = IpPacket.parse(data)
            if packet.fragment:
                raise MalformedPacket("fragment")
            if packet.protocol == PROTO_UDP:
                self._receive_udp(packet, checksum_trusted)
                return
            if packet.protocol != PROTO_TCP:
                # ICMPv6 neighbour discovery and router solicitations arrive as soon as the
                # link is up: expected noise, counted apart from real drops.
                raise MalformedPacket(
                    "ipv6_control" if packet.protocol == PROTO_ICMPV6 else "unsupported_protocol"
                )
            segment = TcpSegment.parse(packet, checksum_trusted)
        except MalformedPacket as exc:
            self.drops[exc.reason] += 1
            return
        self._receive_tcp(packet, segment, now)

    def send_datagram(
        self, src: IPAddress, src_port: int, dst: IPAddress, dst_port: int, payload: bytes
    ) -> None:
        """Send a UDP datagram to a client (`dst`), from the address it wrote to (`src`)."""
        if src.version != dst.version:
            raise ValueError("source and destination address families differ")
        datagram = UdpDatagram(src_port, dst_port, payload)
        self._out.append(
            datagram.build(src.version, src.packed, dst.packed, offload=self.config.offload)
        )

    def packets_to_send(self, now: float) -> list[bytes]:
        """Flush every flow touched since the last call; return the packets for the TUN."""
        if self._dirty:
            dirty = list(self._dirty.values())
            self._dirty.clear()
            for conn in dirty:
                if conn.state is not TcpState.CLOSED:
                    conn.flush(now)
                self._after(conn)
        packets = self._out[:]
        self._out.clear()
        return packets

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The earliest deadline of any flow, or None."""
        timers = self._timers
        while timers:
            deadline, flow_id = timers[0]
            if self._scheduled.get(flow_id) == deadline:
                return deadline
            heapq.heappop(timers)  # stale: the flow was rescheduled or is gone
        return None

    def handle_timer(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, flow_id = heapq.heappop(timers)
            if self._scheduled.get(flow_id) != deadline:
                continue
            del self._scheduled[flow_id]
            conn = self._by_id[flow_id]
            conn.handle_timer(now)
            self._after(conn)

    # ---------------------------------------------------------------- flows (layer above)

    def accept(self, flow_id: int, now: float) -> None:
        conn = self._by_id.get(flow_id)
        if conn is not None and conn.state is TcpState.LISTEN:
            conn.accept(now)
            self._after(conn)

    def reject(self, flow_id: int) -> None:
        conn = self._by_id.get(flow_id)
        if conn is not None and conn.state is TcpState.LISTEN:
            conn.reject()
            self._after(conn)

    def send(self, flow_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue data for the client; return the space left (<= 0 means: stop reading)."""
        conn = self._by_id.get(flow_id)
        if conn is None or conn.state is TcpState.CLOSED:
            return 0
        space = conn.send(data)
        self._after(conn)
        return space

    def receive(self, flow_id: int) -> bytes:
        conn = self._by_id.get(flow_id)
        if conn is None:
            return b""
        data = conn.receive()
        self._after(conn)
        return data

    def shutdown(self, flow_id: int) -> None:
        conn = self._by_id.get(flow_id)
        if conn is not None:
            conn.shutdown()
            self._after(conn)

    def abort(self, flow_id: int) -> None:
        conn = self._by_id.get(flow_id)
        if conn is not None:
            conn.abort()
            self._after(conn)

    def connection(self, flow_id: int) -> TcpConnection | None:
        return self._by_id.get(flow_id)

    def connections(self) -> list[TcpConnection]:
        return list(self._by_id.values())

    @property
    def flow_count(self) -> int:
        return len(self._by_id)

    @property
    def half_open_count(self) -> int:
        return len(self._half_open)

    def close_all(self) -> None:
        """Reset every flow (shutdown of the program)."""
        for conn in list(self._by_id.values()):
            conn.abort()
            self._after(conn)

    # ---------------------------------------------------------------- internals

    def _receive_udp(self, packet: IpPacket, checksum_trusted: bool) -> None:
        datagram = UdpDatagram.parse(packet, checksum_trusted)
        self._events.append(
            DatagramReceived(
                ipaddress.ip_address(packet.src),
                datagram.src_port,
                ipaddress.ip_address(packet.dst),
                datagram.dst_port,
                bytes(datagram.payload),
            )
        )

    def _receive_tcp(self, packet: IpPacket, seg: TcpSegment, now: float) -> None:
        key = (packet.src, seg.src_port, packet.dst, seg.dst_port)
        conn = self._flows.get(key)
        flags = seg.flags
        is_syn = flags & (SYN | ACK | RST) == SYN
        if conn is not None and conn.state is TcpState.TIME_WAIT and is_syn:
            # A new connection on a 4-tuple in TIME-WAIT (RFC 9293 3.10.7.4, as Linux does):
            # our TIME-WAIT only absorbs stray FINs, so the old one can simply go.
            self._remove(conn)
            conn = None
        if conn is not None:
            conn.receive_segment(seg, now)
            self._after(conn)
            return
        if flags & RST:
            return
        if not is_syn:
            self._send_reset(packet, seg)  # RFC 9293 3.10.7.1, CLOSED
            self.drops["no_flow"] += 1
            return
        if len(self._by_id) >= self.config.max_flows:
            self.drops["flow_limit"] += 1
            self._send_reset(packet, seg)
            return
        if len(self._half_open) >= self.config.max_half_open:
            self.drops["half_open_limit"] += 1
            self._send_reset(packet, seg)
            return
        flow_id = self._next_id
        self._next_id += 1
        conn = TcpConnection(
            flow_id,
            self._tcp_config[packet.version],
            packet.version,
            (packet.src, seg.src_port),
            (packet.dst, seg.dst_port),
            seg,
            self._rng.getrandbits(32),
            now,
            self._events,
            self._out,
        )
        self._flows[key] = conn
        self._by_id[flow_id] = conn
        self._keys[flow_id] = key
        self.flows_total += 1
        self._events.append(
            FlowRequested(
                flow_id,
                ipaddress.ip_address(packet.src),
                seg.src_port,
                ipaddress.ip_address(packet.dst),
                seg.dst_port,
            )
        )
        self._after(conn)

    def _after(self, conn: TcpConnection) -> None:
        """Bookkeeping after anything happened to `conn`: output, timer, half-open, close."""
        flow_id = conn.flow_id
        if conn.state is TcpState.CLOSED:
            self._remove(conn)
            return
        if conn.half_open:
            self._half_open.add(flow_id)
        else:
            self._half_open.discard(flow_id)
        if conn.wants_flush:
            self._dirty[flow_id] = conn
        deadline = conn.deadline
        scheduled = self._scheduled.get(flow_id)
        if deadline is not None and (scheduled is None or deadline < scheduled):
            self._scheduled[flow_id] = deadline
            heapq.heappush(self._timers, (deadline, flow_id))
            if len(self._timers) > 4 * len(self._scheduled) + 1024:
                # Drop stale entries so that a busy flow cannot grow the heap without bound.
                self._timers = [(d, f) for f, d in self._scheduled.items()]
                heapq.heapify(self._timers)

    def _remove(self, conn: TcpConnection) -> None:
        flow_id = conn.flow_id
        key = self._keys.pop(flow_id, None)
        if key is not None and self._flows.get(key) is conn:
            del self._flows[key]
        self._by_id.pop(flow_id, None)
        self._half_open.discard(flow_id)
        self._dirty.pop(flow_id, None)
        self._scheduled.pop(flow_id, None)

    def _send_reset(self, packet: IpPacket, seg: TcpSegment) -> None:
        """RST for a segment that belongs to no flow (RFC 9293 3.10.7.1)."""
        if seg.flags & ACK:
            reply = TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
        else:
            seg_len = (
                len(seg.payload) + (1 if seg.flags & SYN else 0) + (1 if seg.flags & FIN else 0)
            )
            reply = TcpSegment(
                seg.dst_port, seg.src_port, 0, (seg.seq + seg_len) & 0xFFFFFFFF, RST | ACK, 0
            )
        self._out.append(
            reply.build(packet.version, packet.dst, packet.src, offload=self.config.offload)
        )
