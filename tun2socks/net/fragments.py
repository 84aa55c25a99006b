"""IP fragments: reassembly of what clients send, fragmentation of what we send (sans-IO).

Theory of operation
-------------------
`Reassembler.add(data, now)` takes one fragment (an IPv4 packet with MF or an offset, or an
IPv6 packet with a fragment header) and returns the whole packet once its last piece is in,
rebuilt as an ordinary unfragmented packet that `IpPacket.parse` reads like any other.
Datagrams are keyed as the RFCs say: source, destination, protocol and identification for
IPv4 (RFC 791), source, destination and identification for IPv6 (RFC 8200 4.5).

Bounded in memory and time, whatever the client sends:
- every fragment costs its size plus a fixed overhead, so tiny fragments cannot hold much
  memory cheaply; when a new fragment would exceed `max_memory`, the oldest datagrams are
  dropped first (as gVisor does), and a datagram that alone exceeds it is dropped;
- a datagram not complete `timeout` seconds after its first fragment is dropped
  (`expire(now)`, driven by the stack's timer through `deadline`);
- a whole datagram never exceeds 65535 bytes.

Overlapping fragments drop the whole datagram: RFC 5722 requires it for IPv6, and Linux does
the same for IPv4 since 2018 (overlaps only serve to evade inspection). Exact duplicates
(same offset, length and bytes) are not overlaps: the copy is dropped, the datagram kept
(RFC 5722 section 4 allows this).

`Fragmenter.split(packet)` cuts a packet we built (no IPv4 options, no IPv6 extension
headers) into fragments that fit the MTU: IPv4 fragments with MF and offsets, IPv6 fragments
with a fragment header (a source may fragment, RFC 8200 4.5). Checksums inside must be
complete: a partial (offloaded) checksum can only be finished on a whole packet.
"""

from __future__ import annotations

import bisect
import random
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from tun2socks.net.checksum import checksum
from tun2socks.net.ip import IPV4_HEADER_LEN, IPV6_HEADER_LEN

FRAGMENT_OVERHEAD = 64  # bytes charged per stored fragment on top of its data
MAX_DATAGRAM = 0xFFFF  # RFC 791 total length, RFC 8200 payload length: 16 bits
IPV6_FRAGMENT_HEADER = 44
IPV6_FRAGMENT_HEADER_LEN = 8
_IPV6_SKIPPABLE = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options

_V4_MF = 0x2000
_V4_OFFSET = 0x1FFF
_V6_MF = 0x0001

Key = tuple[int | bytes, ...]


@dataclass(slots=True)
class _Datagram:
    """One datagram being reassembled: its pieces sorted by offset, none overlapping."""

    version: int
    first_seen: float
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list)
    received: int = 0  # data bytes held; equals `total` exactly when every byte is in
    total: int | None = None  # known once the last fragment (MF clear) has arrived
    header: bytes = b""  # from the fragment at offset 0: IPv4 header, or IPv6 fixed header
    protocol: int = -1  # IPv6: the next header named by the fragment at offset 0
    cost: int = 0


class Reassembler:
    """Reassembles fragmented IPv4 and IPv6 datagrams; drops are counted in `drops`."""

    def __init__(self, max_memory: int, timeout: float, drops: Counter[str] | None = None):
        self.max_memory = max_memory
        self.timeout = timeout
        self.drops: Counter[str] = drops if drops is not None else Counter()
        self.memory = 0
        self.reassembled = 0
        self._datagrams: OrderedDict[Key, _Datagram] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._datagrams)

    @property
    def deadline(self) -> float | None:
        """When the oldest incomplete datagram times out, or None."""
        for datagram in self._datagrams.values():
            return datagram.first_seen + self.timeout
        return None

    def expire(self, now: float) -> None:
        """Drop the datagrams that were not completed in time."""
        datagrams = self._datagrams
        while datagrams:
            key, datagram = next(iter(datagrams.items()))
            if datagram.first_seen + self.timeout > now:
                return
            self._discard(key, "reassembly_timeout")

    def add(self, data: bytes | memoryview, now: float) -> bytes | None:
        """Store one fragment (a packet `IpPacket.parse` accepted and marked as a fragment);
        the whole packet once complete, else None."""
        self.expire(now)
        view = memoryview(data)
        parsed = _parse_v4(view) if view[0] >> 4 == 4 else _parse_v6(view)
        if parsed is None:
            self.drops["bad_fragment"] += 1
            return None
        key, start, more, payload, header, protocol = parsed
        if start == 0 and view[0] >> 4 == 6 and not _header_chain_complete(protocol, payload):
            # RFC 7112 5: a first fragment must hold the whole header chain, up to and
            # including the upper-layer header (else filters cannot see the ports).
            self.drops["tiny_first_fragment"] += 1
            return None
        end = start + len(payload)
        limit = MAX_DATAGRAM - (len(header) if view[0] >> 4 == 4 else 0)
        if (more and len(payload) % 8) or not payload or end > limit:
            # RFC 8200 4.5: a non-last fragment is a multiple of 8 bytes; nothing may end
            # beyond what a whole datagram can hold.
            self.drops["bad_fragment"] += 1
            return None
        if start == 0 and not more:  # an atomic fragment (RFC 6946): a whole packet already
            return _rebuild(view[0] >> 4, header, protocol, [bytes(payload)], len(payload))
        datagram = self._datagrams.get(key)
        if datagram is None:
            datagram = self._datagrams[key] = _Datagram(view[0] >> 4, now)
        return self._insert(key, datagram, start, end, more, payload, header, protocol)

    def _insert(
        self,
        key: Key,
        datagram: _Datagram,
        start: int,
        end: int,
        more: bool,
        payload: memoryview,
        header: bytes,
        protocol: int,
    ) -> bytes | None:
        starts, ends = datagram.starts, datagram.ends
        index = bisect.bisect_left(starts, start)
        if index < len(starts) and starts[index] == start and ends[index] == end:
            if datagram.pieces[index] == payload:
                self.drops["fragment_duplicate"] += 1
                return None
            self._discard(key, "fragment_overlap")
            return None
        overlaps = (index > 0 and ends[index - 1] > start) or (
            index < len(starts) and starts[index] < end
        )
        if overlaps:
            self._discard(key, "fragment_overlap")
            return None
        total = datagram.total
        if not more:
            if total is not None and total != end:
                self._discard(key, "bad_fragment")  # two different last fragments
                return None
            total = end
        if total is not None and (end > total or (ends and ends[-1] > total)):
            self._discard(key, "bad_fragment")  # data beyond the last fragment's end
            return None
        datagram.total = total
        cost = len(payload) + FRAGMENT_OVERHEAD
        if not self._make_room(key, cost):
            return None
        starts.insert(index, start)
        ends.insert(index, end)
        datagram.pieces.insert(index, bytes(payload))
        datagram.received += len(payload)
        datagram.cost += cost
        self.memory += cost
        if start == 0:
            datagram.header, datagram.protocol = header, protocol
        if datagram.total is None or datagram.received != datagram.total:
            return None
        # No overlaps and as many bytes as the total: the pieces cover it exactly.
        self._discard(key, None)
        self.reassembled += 1
        return _rebuild(
            datagram.version, datagram.header, datagram.protocol, datagram.pieces, datagram.total
        )

    def _make_room(self, key: Key, cost: int) -> bool:
        """Evict the oldest other datagrams until `cost` more bytes fit; False if they never can."""
        while self.memory + cost > self.max_memory:
            victim = next((k for k in self._datagrams if k != key), None)
            if victim is None:  # this datagram alone is too big
                self._discard(key, "reassembly_memory")
                return False
            self._discard(victim, "reassembly_memory")
        return True

    def _discard(self, key: Key, reason: str | None) -> None:
        datagram = self._datagrams.pop(key)
        self.memory -= datagram.cost
        if reason is not None:
            self.drops[reason] += 1


def _parse_v4(
    view: memoryview,
) -> tuple[Key, int, bool, memoryview, bytes, int] | None:
    ihl = (view[0] & 0x0F) * 4
    total_len, ident, frag = struct.unpack_from("!HHH", view, 2)
    protocol = view[9]
    key: Key = (4, bytes(view[12:16]), bytes(view[16:20]), protocol, ident)
    start = (frag & _V4_OFFSET) * 8
    return key, start, bool(frag & _V4_MF), view[ihl:total_len], bytes(view[:ihl]), protocol


def _parse_v6(
    view: memoryview,
) -> tuple[Key, int, bool, memoryview, bytes, int] | None:
    payload_len = struct.unpack_from("!H", view, 4)[0]
    end = IPV6_HEADER_LEN + payload_len
    next_header, offset = view[6], IPV6_HEADER_LEN
    # Bounded: each extension header is at least 8 bytes; IpPacket.parse checked the lengths.
    while next_header in _IPV6_SKIPPABLE:
        next_header = view[offset]
        offset += (view[offset + 1] + 1) * 8
    if next_header != IPV6_FRAGMENT_HEADER or offset + IPV6_FRAGMENT_HEADER_LEN > end:
        return None
    protocol = view[offset]
    offset_flags, ident = struct.unpack_from("!HI", view, offset + 2)
    key: Key = (6, bytes(view[8:24]), bytes(view[24:40]), ident)
    payload = view[offset + IPV6_FRAGMENT_HEADER_LEN : end]
    start = (offset_flags >> 3) * 8
    return key, start, bool(offset_flags & _V6_MF), payload, bytes(view[:IPV6_HEADER_LEN]), protocol


_UPPER_HEADER_LEN = {6: 20, 17: 8, 58: 4}  # TCP, UDP, ICMPv6


def _header_chain_complete(protocol: int, payload: memoryview) -> bool:
    """Whether a first IPv6 fragment's data holds every extension header and the
    upper-layer header (RFC 7112)."""
    offset = 0
    while protocol in _IPV6_SKIPPABLE:
        if offset + 2 > len(payload):
            return False
        protocol = payload[offset]
        offset += (payload[offset + 1] + 1) * 8
    return offset + _UPPER_HEADER_LEN.get(protocol, 0) <= len(payload)


def _rebuild(version: int, header: bytes, protocol: int, pieces: list[bytes], total: int) -> bytes:
    """The reassembled datagram as one unfragmented packet."""
    if version == 4:
        ihl = len(header)
        fixed = bytearray(header)
        struct.pack_into("!H", fixed, 2, ihl + total)
        struct.pack_into("!H", fixed, 6, 0)  # no MF, offset 0 (and DF clear)
        struct.pack_into("!H", fixed, 10, 0)
        struct.pack_into("!H", fixed, 10, checksum(fixed))
        return b"".join((fixed, *pieces))
    # IPv6: the fixed header, pointing straight at what followed the fragment header. The
    # extension headers before it (hop-by-hop, routing) were only for the path.
    fixed = bytearray(header)
    struct.pack_into("!HB", fixed, 4, total, protocol)
    return b"".join((fixed, *pieces))


class Fragmenter:
    """Cuts packets larger than the MTU into fragments.  Identifications are random (RFC 7739:
    a counter would let others guess them and inject fragments); `rng` is a CSPRNG unless a
    test passes a seeded generator."""

    def __init__(self, mtu: int, rng: random.Random | None = None) -> None:
        if mtu < IPV4_HEADER_LEN + 8:
            raise ValueError(f"MTU {mtu} leaves no room for a fragment")
        self.mtu = mtu
        self._rng = rng or random.SystemRandom()
        self.fragmented = 0

    def split(self, packet: bytes) -> list[bytes]:
        """`packet` itself if it fits the MTU, else its fragments in order."""
        if len(packet) <= self.mtu:
            return [packet]
        self.fragmented += 1
        if packet[0] >> 4 == 4:
            return self._split_v4(packet, self._rng.getrandbits(16))
        return self._split_v6(packet, self._rng.getrandbits(32))

    def _split_v4(self, packet: bytes, ident: int) -> list[bytes]:
        ihl = (packet[0] & 0x0F) * 4
        header = bytearray(packet[:ihl])
        data = memoryview(packet)[ihl:]
        step = (self.mtu - ihl) // 8 * 8
        fragments = []
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            more = _V4_MF if start + step < len(data) else 0
            struct.pack_into("!HHH", header, 2, ihl + len(chunk), ident, more | start // 8)
            struct.pack_into("!H", header, 10, 0)
            struct.pack_into("!H", header, 10, checksum(header))
            fragments.append(b"".join((header, chunk)))
        return fragments

    def _split_v6(self, packet: bytes, ident: int) -> list[bytes]:
        header = bytearray(packet[:IPV6_HEADER_LEN])
        protocol = header[6]
        header[6] = IPV6_FRAGMENT_HEADER
        data = memoryview(packet)[IPV6_HEADER_LEN:]
        step = (self.mtu - IPV6_HEADER_LEN - IPV6_FRAGMENT_HEADER_LEN) // 8 * 8
        if step <= 0:
            raise ValueError(f"MTU {self.mtu} leaves no room for an IPv6 fragment")
        fragments = []
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            more = _V6_MF if start + step < len(data) else 0
            struct.pack_into("!H", header, 4, IPV6_FRAGMENT_HEADER_LEN + len(chunk))
            fragment_header = struct.pack("!BBHI", protocol, 0, start | more, ident)
            fragments.append(b"".join((header, fragment_header, chunk)))
        return fragments
