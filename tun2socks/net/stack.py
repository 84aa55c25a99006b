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
Over the half-open cap a bounded SYN cache answers at once, with SYN cookies as ISNs, so
that a flood evicting a real client's entry cannot cost that client its connection.

Bad input never raises: a packet that does not parse is counted in `drops` by reason.
Fragments are reassembled first (`fragments.py`), bounded in memory and time.  UDP becomes
`DatagramReceived` events; replies larger than the MTU leave as fragments.  ICMP echo is
answered here and other protocols get an ICMP error (`icmp_responder.py`).
"""

from __future__ import annotations

import heapq
import ipaddress
import random
from collections import Counter, deque
from dataclasses import dataclass

from tun2socks.net.events import DatagramReceived, Event, FlowRequested, IPAddress
from tun2socks.net.fragments import Fragmenter, Reassembler
from tun2socks.net.icmp_responder import IcmpResponder
from tun2socks.net.ip import (
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IpPacket,
    MalformedPacket,
)
from tun2socks.net.isn import IsnGenerator
from tun2socks.net.pmtu import is_too_big, parse_too_big
from tun2socks.net.syn_cookies import SynCookies
from tun2socks.net.tcp import ACK, FIN, RST, SYN, TCP_HEADER_LEN, TcpSegment
from tun2socks.net.tcp_conn import TcpConfig, TcpConnection, TcpState
from tun2socks.net.udp import UdpDatagram

FourTuple = tuple[bytes, int, bytes, int]  # client address, client port, server address, port

IPV4_MAX_PAYLOAD = 0xFFFF - IPV4_HEADER_LEN - TCP_HEADER_LEN


class FlowStateError(Exception):
    """The layer above misused the flow API: a flow id the stack never issued, or `send`
    after `shutdown`. A bug of the caller, never caused by what clients send."""


@dataclass(frozen=True, slots=True)
class StackConfig:
    mtu: int = 1500
    offload: bool = False  # the device does checksums and segmentation (TSO)
    recv_buffer: int = 256 * 1024
    send_buffer: int = 256 * 1024
    max_flows: int = 10_000
    max_half_open: int = 1_000
    max_syn_cache: int = 4_096  # SYNs answered over max_half_open, awaiting the client's ACK
    # Keep-alive: probes after `idle_timeout` seconds without a segment from the client,
    # every `keepalive_interval`; reset after `keepalive_probes` unanswered (tcp_config.py).
    idle_timeout: float = 600.0
    keepalive_interval: float = 75.0
    keepalive_probes: int = 9
    time_wait: float = 2.0
    icmp_echo: bool = True  # answer echo requests (ping) locally
    reassembly_memory: int = 4 * 1024 * 1024  # bytes held by incomplete fragmented datagrams
    reassembly_timeout: float = 30.0  # seconds to complete one (Linux's ipfrag_time)

    def tcp_config(self, version: int) -> TcpConfig:
        ip_header = IPV4_HEADER_LEN if version == 4 else IPV6_HEADER_LEN
        mss = self.mtu - ip_header - TCP_HEADER_LEN
        return TcpConfig(
            mss=mss,
            recv_buffer=self.recv_buffer,
            send_buffer=self.send_buffer,
            # With TSO, super-packets that the kernel cuts at each flow's MSS.
            super_segment=IPV4_MAX_PAYLOAD if self.offload else None,
            offload=self.offload,
            idle_timeout=self.idle_timeout,
            keepalive_interval=self.keepalive_interval,
            keepalive_probes=self.keepalive_probes,
            time_wait=self.time_wait,
        )


class Stack:
    def __init__(self, config: StackConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._tcp_config = {4: config.tcp_config(4), 6: config.tcp_config(6)}
        # Over the half-open cap, SYNs are answered at once from a bounded SYN cache (as
        # FreeBSD's syncache): no upstream until the client completes the handshake, so
        # spoofed SYNs cost one small object each. Its SYN-ACKs are retried like any other:
        # in a burst, queues on the path may hold a real client's ACK for seconds, and giving
        # up early would reset that client.
        self._early: dict[int, TcpConnection] = {}  # insertion order: oldest first
        # A CSPRNG unless a test passes a seeded generator: ISNs (RFC 6528) and fragment
        # identifications (RFC 7739) must not be predictable.
        self._rng = rng or random.SystemRandom()
        self._isn = IsnGenerator(self._rng.randbytes(16))
        # The SYN-ACKs of the SYN cache carry cookies, so that a client whose entry was
        # evicted by a flood still completes its handshake (syn_cookies.py).
        self._cookies = SynCookies(self._rng.randbytes(16))
        self.cookie_flows = 0  # flows rebuilt from a cookie after their cache entry went
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
        self.reassembler = Reassembler(
            config.reassembly_memory, config.reassembly_timeout, self.drops
        )
        self.fragmenter = Fragmenter(config.mtu, self._rng)
        self.icmp = IcmpResponder(echo_reply=config.icmp_echo)

    # ---------------------------------------------------------------- driving

    def receive_packet(
        self, data: bytes | memoryview, now: float, checksum_trusted: bool = False
    ) -> None:
        """Process one IP packet read from the TUN."""
        self.packets_in += 1
        try:
            packet = IpPacket.parse(data)
            if packet.fragment:
                whole = self.reassembler.add(data, now)
                if whole is None:
                    return
                # A reassembled datagram's checksum was never offloaded: verify it.
                data, checksum_trusted = whole, False
                packet = IpPacket.parse(whole)
                if packet.fragment:
                    raise MalformedPacket("bad_fragment")  # a fragment inside a fragment
            if packet.protocol == PROTO_UDP:
                self._receive_udp(packet, checksum_trusted)
                return
            if packet.protocol != PROTO_TCP:
                self._receive_other(packet, data, now, checksum_trusted)
                return
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
        packet = datagram.build(src.version, src.packed, dst.packed, offload=self.config.offload)
        if len(packet) > self.config.mtu:
            # Only whole packets get an offloaded checksum finished: compute it before cutting.
            packet = datagram.build(src.version, src.packed, dst.packed)
            self._out.extend(self.fragmenter.split(packet))
            return
        self._out.append(packet)

    def refuse_datagram(
        self, datagram: DatagramReceived, now: float, *, mtu: int | None = None
    ) -> None:
        """Answer a client's datagram that cannot be carried with an ICMP error: port
        unreachable, or with `mtu` (the largest packet that could pass) fragmentation needed
        (IPv4) / packet too big (IPv6). Rate limited; never about multicast or broadcast."""
        # The error quotes the datagram: rebuilt from the event, the client matches it by
        # addresses and ports.
        original = UdpDatagram(datagram.src_port, datagram.dst_port, datagram.payload).build(
            datagram.src.version, datagram.src.packed, datagram.dst.packed
        )
        if mtu is None:
            error = self.icmp.port_unreachable(original, now)
        else:
            error = self.icmp.too_big(original, mtu, now)
        if error is not None:
            self._out.extend(self.fragmenter.split(error))

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
        """Whether `next_event` has something: events arise from `receive_packet`,
        `handle_timer` and the flow calls below, never on their own."""
        return bool(self._events)

    def next_event(self) -> Event | None:
        """The oldest event not taken yet, or None. Events of one flow come in order;
        after its `FlowEnded` or `FlowReset` there are none for it."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The earliest deadline of any flow or of fragment reassembly, or None."""
        flows = self._flow_deadline()
        fragments = self.reassembler.deadline
        if fragments is None or (flows is not None and flows <= fragments):
            return flows
        return fragments

    def _flow_deadline(self) -> float | None:
        timers = self._timers
        while timers:
            deadline, flow_id = timers[0]
            if self._scheduled.get(flow_id) == deadline:
                return deadline
            heapq.heappop(timers)  # stale: the flow was rescheduled or is gone
        return None

    def handle_timer(self, now: float) -> None:
        """Run what is due at `now` (retransmissions, probes, idle and TIME-WAIT ends,
        fragment expiry); calling it early or twice does nothing harmful."""
        if self.reassembler:
            self.reassembler.expire(now)
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
    #
    # The contract, as h11 states its own: a flow id is one that a `FlowRequested` event named.
    # Once the stack has closed a flow (after `FlowEnded` or `FlowReset`, or in the same batch,
    # before the layer above has seen that event) each call below answers as for a closed flow
    # and changes nothing: a relay may race the client's RST. A flow id this stack never issued,
    # and `send` after `shutdown`, are bugs of the caller: FlowStateError.

    def accept(self, flow_id: int, now: float) -> None:
        """The upstream is connected: answer the client's SYN with SYN-ACK. A flow that
        already completed its handshake (from the SYN cache) or is closed is left as it is."""
        conn = self._flow(flow_id)
        if conn is not None and conn.state is TcpState.LISTEN:
            conn.accept(now)
            self._after(conn)

    def reject(self, flow_id: int) -> None:
        """The upstream cannot be opened: RST to the client (a flow past its handshake, from
        the SYN cache, is reset). Nothing for a closed flow."""
        conn = self._flow(flow_id)
        if conn is not None and conn.state is TcpState.LISTEN:
            conn.reject()
            self._after(conn)
        elif conn is not None:
            conn.abort()  # a flow from the SYN cache: the handshake is done, reset it
            self._after(conn)

    def send(self, flow_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue `data` for the client; return the send space left: at <= 0 stop reading the
        upstream until `SendSpaceAvailable`. A closed flow takes nothing and returns 0.
        Raises FlowStateError after `shutdown` of this flow."""
        conn = self._flow(flow_id)
        if conn is None or conn.state is TcpState.CLOSED:
            return 0
        if conn.fin_queued:
            raise FlowStateError(f"flow {flow_id}: send after shutdown")
        space = conn.send(data)
        self._after(conn)
        return space

    def receive(self, flow_id: int) -> bytes:
        """Take everything the client sent that was not taken yet; its receive window opens.
        b"" for a closed flow. Whether the client's stream has ended: `at_eof`."""
        conn = self._flow(flow_id)
        if conn is None:
            return b""
        data = conn.receive()
        self._after(conn)
        return data

    def at_eof(self, flow_id: int) -> bool:
        """The client sent FIN and `receive` has taken every byte before it (False for a
        closed flow: its end was reported by `FlowEnded` or `FlowReset`)."""
        conn = self._flow(flow_id)
        return conn is not None and conn.at_eof

    def buffered(self, flow_id: int) -> int:
        """Bytes the client sent that `receive` has not taken yet (0 for a closed flow)."""
        conn = self._flow(flow_id)
        if conn is None:
            return 0
        return conn.config.recv_buffer - conn.receive_window

    def shutdown(self, flow_id: int) -> None:
        """The upstream has no more data: FIN to the client after what is queued. Repeating
        it, or a closed flow, changes nothing."""
        conn = self._flow(flow_id)
        if conn is not None:
            conn.shutdown()
            self._after(conn)

    def abort(self, flow_id: int) -> None:
        """Reset the flow: RST to the client, no more events for it. Nothing for a closed flow."""
        conn = self._flow(flow_id)
        if conn is not None:
            conn.abort()
            self._after(conn)

    def _flow(self, flow_id: int) -> TcpConnection | None:
        """The open flow `flow_id`, None if it is closed; FlowStateError if never issued."""
        conn = self._by_id.get(flow_id)
        if conn is None and not 0 < flow_id < self._next_id:
            raise FlowStateError(f"no flow {flow_id}: this stack never opened it")
        return conn

    def connection(self, flow_id: int) -> TcpConnection | None:
        """The open flow's connection, for reading (tests, the API's view); None if closed.
        The relay does not need it: the calls above answer its questions."""
        return self._by_id.get(flow_id)

    def connections(self) -> list[TcpConnection]:
        """Every open flow's connection, for reading."""
        return list(self._by_id.values())

    @property
    def flow_count(self) -> int:
        return len(self._by_id)

    @property
    def half_open_count(self) -> int:
        return len(self._half_open)

    def ip_stats(self) -> dict[str, int]:
        """Counters of fragments, ICMP and SYN cookies (the API shows them; drops: `drops`)."""
        return {
            "fragments_reassembled": self.reassembler.reassembled,
            "fragments_pending": len(self.reassembler),
            "reassembly_memory": self.reassembler.memory,
            "datagrams_fragmented": self.fragmenter.fragmented,
            "icmp_echo_replies": self.icmp.echo_replies,
            "icmp_errors_sent": self.icmp.errors_sent,
            "icmp_errors_limited": self.icmp.errors_limited,
            "syn_cookie_flows": self.cookie_flows,
        }

    def close_all(self) -> None:
        """Reset every flow (shutdown of the program)."""
        for conn in list(self._by_id.values()):
            conn.abort()
            self._after(conn)

    # ---------------------------------------------------------------- internals

    def _receive_other(
        self, packet: IpPacket, data: bytes | memoryview, now: float, checksum_trusted: bool
    ) -> None:
        """ICMP: echo answered, the rest counted. Other protocols: an ICMP error, so that the
        sender knows at once (raises MalformedPacket to count a drop)."""
        if packet.protocol == (PROTO_ICMP if packet.version == 4 else PROTO_ICMPV6):
            if is_too_big(packet):
                self._receive_too_big(packet, now, checksum_trusted)
                return
            reply: bytes | None = self.icmp.receive(packet, checksum_trusted)
        else:
            self.drops["unsupported_protocol"] += 1
            reply = self.icmp.protocol_unreachable(data, now)
        if reply is not None:
            self._out.extend(self.fragmenter.split(reply))

    def _receive_too_big(self, packet: IpPacket, now: float, checksum_trusted: bool) -> None:
        """ICMP fragmentation needed / packet too big about one of our segments: that flow's
        MSS goes down (RFC 1191, RFC 8201), if the quoted segment is in flight."""
        too_big = parse_too_big(packet, checksum_trusted)
        if too_big is None:
            raise MalformedPacket("icmp_too_big_ignored")
        key, seq, mtu = too_big
        conn = self._flows.get(key)
        if conn is None or not conn.path_mtu_reduced(mtu, seq, now):
            raise MalformedPacket("icmp_too_big_ignored")
        self._after(conn)

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
        if (
            conn is not None
            and conn.state is TcpState.TIME_WAIT
            and is_syn
            and conn.may_reopen(seg.seq)
        ):
            # A new connection on a 4-tuple in TIME-WAIT, its SYN above the old RCV.NXT
            # (RFC 6191, RFC 1122 4.2.2.13): our TIME-WAIT only absorbs stray FINs, so the old
            # one can simply go.  Other SYNs get TIME-WAIT's challenge ACK.
            self._remove(conn)
            conn = None
        if conn is not None:
            conn.receive_segment(seg, now)
            self._after(conn)
            return
        if flags & RST:
            return
        if not is_syn:
            if flags & (SYN | ACK) == ACK and self._from_cookie(key, packet, seg, now):
                return
            self._send_reset(packet, seg)  # RFC 9293 3.10.7.1, CLOSED
            self.drops["no_flow"] += 1
            return
        if flags & FIN:
            self.drops["syn_fin"] += 1  # no legitimate stack sends SYN+FIN: a scan
            return
        if not (
            _is_unicast(packet.version, packet.dst) and _is_unicast(packet.version, packet.src)
        ):
            self.drops["syn_not_unicast"] += 1  # RFC 1122 4.2.3.10: silently discarded
            return
        if len(self._by_id) - len(self._early) >= self.config.max_flows:
            self.drops["flow_limit"] += 1
            self._send_reset(packet, seg)
            return
        early = len(self._half_open) >= self.config.max_half_open
        if not early:
            isn = self._isn.isn(packet.src, seg.src_port, packet.dst, seg.dst_port, now)
            conn = self._open(key, packet.version, seg, isn, now)
            self._request(conn)
            self._after(conn)
            return
        self.drops["half_open_limit"] += 1
        if len(self._early) >= self.config.max_syn_cache:
            # Silently: a RST helps no spoofed source, and it would kill a real client whose
            # ACK is still on its way; that ACK carries the cookie and rebuilds the flow.
            self._remove(next(iter(self._early.values())))
        cookie = self._cookies.make(key, seg.seq, seg.options, packet.version, now)
        conn = self._open(key, packet.version, seg, cookie, now, early=True)
        conn.accept(now)
        self._after(conn)

    def _open(
        self,
        key: FourTuple,
        version: int,
        syn: TcpSegment,
        iss: int,
        now: float,
        *,
        early: bool = False,
    ) -> TcpConnection:
        """A new flow for `syn`; in the SYN cache when `early` (see _after)."""
        flow_id = self._next_id
        self._next_id += 1
        conn = TcpConnection(
            flow_id,
            self._tcp_config[version],
            version,
            (key[0], key[1]),
            (key[2], key[3]),
            syn,
            iss,
            now,
            self._events,
            self._out,
        )
        self._flows[key] = conn
        self._by_id[flow_id] = conn
        self._keys[flow_id] = key
        self.flows_total += 1
        if early:
            self._early[flow_id] = conn
        return conn

    def _from_cookie(self, key: FourTuple, packet: IpPacket, seg: TcpSegment, now: float) -> bool:
        """An ACK that completes a handshake of the SYN cache whose entry was evicted: rebuild
        the flow from the cookie it echoes (RFC 4987 3.6) and let the ACK complete it."""
        irs = (seg.seq - 1) & 0xFFFFFFFF
        options = self._cookies.check(key, irs, (seg.ack - 1) & 0xFFFFFFFF, now)
        if options is None or len(self._by_id) - len(self._early) >= self.config.max_flows:
            return False
        syn = TcpSegment(seg.src_port, seg.dst_port, irs, 0, SYN, seg.window, options=options)
        conn = self._open(key, packet.version, syn, (seg.ack - 1) & 0xFFFFFFFF, now, early=True)
        sent = len(self._out)
        conn.accept(now)
        del self._out[sent:]  # the client has our SYN-ACK already
        conn.receive_segment(seg, now)
        self.cookie_flows += 1
        self._after(conn)  # ESTABLISHED: leaves the cache and is requested upstream
        return True

    def _request(self, conn: TcpConnection) -> None:
        self._events.append(
            FlowRequested(
                conn.flow_id,
                ipaddress.ip_address(conn.remote_addr),
                conn.remote_port,
                ipaddress.ip_address(conn.local_addr),
                conn.local_port,
            )
        )

    def _after(self, conn: TcpConnection) -> None:
        """Bookkeeping after anything happened to `conn`: output, timer, half-open, close."""
        flow_id = conn.flow_id
        if flow_id in self._early and conn.state is not TcpState.SYN_RECEIVED:
            del self._early[flow_id]
            if conn.state is not TcpState.CLOSED:
                self._request(conn)  # a real client: now the upstream
        if conn.state is TcpState.CLOSED:
            self._remove(conn)
            return
        if conn.half_open and flow_id not in self._early:
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
        self._early.pop(flow_id, None)
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


def _is_unicast(version: int, address: bytes) -> bool:
    """Not multicast (224/4, ff00::/8) nor the limited broadcast (255.255.255.255)."""
    if version == 4:
        return address[0] & 0xF0 != 0xE0 and address != b"\xff\xff\xff\xff"
    return address[0] != 0xFF
