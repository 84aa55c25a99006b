"""What the stack answers with ICMP: echo replies and errors about traffic it refuses (sans-IO).

Theory of operation
-------------------
Every remote host seems to live inside the TUN, so the stack plays their part for ICMP:
- an echo request (ping, IPv4 and ICMPv6) is answered at once with an echo reply from the
  address that was pinged, unless configured to drop: `ping` and connectivity probes then
  measure the way to the TUN, not to the far host (a SOCKS5 proxy cannot carry ICMP);
- an error goes back for traffic the stack refuses: port unreachable for UDP the relay cannot
  carry, fragmentation needed (IPv4) / packet too big (IPv6) for a datagram too large to
  carry, protocol unreachable (IPv4) / parameter problem, unrecognized next header (IPv6,
  RFC 8200 4) for protocols the stack does not carry at all.

Errors are never sent about an ICMP error, to or from a multicast or broadcast address, or
from an address that is not a single host (RFC 1122 3.2.2; RFC 4443 2.4 e), and they are
rate limited by a token bucket (RFC 4443 2.4 f; Linux also limits ICMPv4), so a flood of
refused traffic cannot become a flood of errors. Time is passed in.

ICMP the stack receives and does not answer (neighbour discovery, errors the client sends
about our packets) raises `MalformedPacket` with a reason, which the stack counts.
"""

from __future__ import annotations

import struct

from tun2socks.net.icmp import (
    ICMP_HEADER_LEN,
    ICMPV4_ECHO_REQUEST,
    ICMPV4_FRAGMENTATION_NEEDED,
    ICMPV4_PORT_UNREACHABLE,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_PORT_UNREACHABLE,
    MAX_ERROR_PACKET_V6,
    IcmpMessage,
    destination_unreachable,
    echo_reply_for,
)
from tun2socks.net.ip import IPV6_HEADER_LEN, PROTO_ICMP, PROTO_ICMPV6, IpPacket, MalformedPacket

ICMPV4_PROTOCOL_UNREACHABLE = 2  # RFC 792
ICMPV6_PACKET_TOO_BIG = 2  # RFC 4443 3.2
ICMPV6_PARAMETER_PROBLEM = 4  # RFC 4443 3.4
ICMPV6_UNRECOGNIZED_NEXT_HEADER = 1
IPV6_MIN_MTU = 1280  # RFC 8200 5

# ICMPv4 error types (RFC 792, RFC 1122 3.2.2): unreachable, source quench, redirect, time
# exceeded, parameter problem. ICMPv6 errors are the types below 128 (RFC 4443 2.1).
_ICMPV4_ERRORS = frozenset({3, 4, 5, 11, 12})
_IPV6_FRAGMENT = 44
_IPV6_SKIPPABLE = frozenset({0, 43, _IPV6_FRAGMENT, 60})

ERROR_RATE = 1000.0  # errors per second, as Linux's net.ipv4.icmp_msgs_per_sec
ERROR_BURST = 50.0  # as Linux's net.ipv4.icmp_msgs_burst


class IcmpResponder:
    def __init__(
        self, *, echo_reply: bool = True, rate: float = ERROR_RATE, burst: float = ERROR_BURST
    ) -> None:
        self.echo_reply = echo_reply
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._refilled: float | None = None
        self.echo_replies = 0
        self.errors_sent = 0
        self.errors_limited = 0

    # ---------------------------------------------------------------- ICMP from clients

    def receive(self, packet: IpPacket, checksum_trusted: bool = False) -> bytes:
        """The answer to an ICMP message from a client; raises MalformedPacket when there is
        none (its reason names the drop counter)."""
        message = IcmpMessage.parse(packet, checksum_trusted)
        request = ICMPV4_ECHO_REQUEST if packet.version == 4 else ICMPV6_ECHO_REQUEST
        if message.type != request or message.code != 0:
            if packet.version == 6 and message.type >= 128:
                # Neighbour discovery, MLD, router solicitation: link noise, expected.
                raise MalformedPacket("ipv6_control")
            raise MalformedPacket("icmp_ignored")
        if not self.echo_reply:
            raise MalformedPacket("icmp_echo_disabled")
        if _is_multicast(packet.version, packet.dst) or not _is_unicast_source(
            packet.version, packet.src
        ):
            raise MalformedPacket("icmp_echo_not_unicast")  # RFC 1122 3.2.2.6: may ignore
        self.echo_replies += 1
        return echo_reply_for(packet, message)

    # ---------------------------------------------------------------- errors we originate

    def port_unreachable(self, original: bytes | memoryview, now: float) -> bytes | None:
        """Port unreachable about the UDP packet `original`, or None when none may be sent."""
        if not self._may_answer(original, now):
            return None
        version = original[0] >> 4
        code = ICMPV4_PORT_UNREACHABLE if version == 4 else ICMPV6_PORT_UNREACHABLE
        return destination_unreachable(original, code)

    def too_big(self, original: bytes | memoryview, mtu: int, now: float) -> bytes | None:
        """Fragmentation needed (IPv4, RFC 1191) or packet too big (IPv6, RFC 4443 3.2)
        naming `mtu`, the largest packet that can pass, about `original`."""
        if not self._may_answer(original, now, too_big=True):
            return None
        if original[0] >> 4 == 4:
            return destination_unreachable(
                original, ICMPV4_FRAGMENTATION_NEEDED, mtu=min(mtu, 0xFFFF)
            )
        rest = struct.pack("!I", max(mtu, IPV6_MIN_MTU))
        return _error_v6(original, ICMPV6_PACKET_TOO_BIG, 0, rest)

    def protocol_unreachable(self, original: bytes | memoryview, now: float) -> bytes | None:
        """Protocol unreachable (IPv4) or parameter problem, unrecognized next header (IPv6)."""
        if not self._may_answer(original, now):
            return None
        if original[0] >> 4 == 4:
            return destination_unreachable(original, ICMPV4_PROTOCOL_UNREACHABLE)
        pointer = _next_header_field(memoryview(original))
        rest = struct.pack("!I", pointer)
        return _error_v6(original, ICMPV6_PARAMETER_PROBLEM, ICMPV6_UNRECOGNIZED_NEXT_HEADER, rest)

    def _may_answer(
        self, original: bytes | memoryview, now: float, *, too_big: bool = False
    ) -> bool:
        view = memoryview(original)
        version = view[0] >> 4
        if version == 4:
            src, dst, protocol = bytes(view[12:16]), bytes(view[16:20]), view[9]
            payload = view[(view[0] & 0x0F) * 4 :]
            if protocol == PROTO_ICMP and payload[:1] and payload[0] in _ICMPV4_ERRORS:
                return False
        else:
            src, dst = bytes(view[8:24]), bytes(view[24:40])
            icmp_type = _icmpv6_type(view)
            if icmp_type is not None and icmp_type < 128:
                return False
        # RFC 4443 2.4 e.3: packet too big may answer a multicast destination.
        if (_is_multicast(version, dst) and not (too_big and version == 6)) or (
            not _is_unicast_source(version, src)
        ):
            return False
        return self._take_token(now)

    def _take_token(self, now: float) -> bool:
        if self._refilled is not None:
            elapsed = max(0.0, now - self._refilled)
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._refilled = now
        if self._tokens < 1.0:
            self.errors_limited += 1
            return False
        self._tokens -= 1.0
        self.errors_sent += 1
        return True


def _error_v6(original: bytes | memoryview, icmp_type: int, code: int, rest: bytes) -> bytes:
    view = memoryview(original)
    quote = view[: MAX_ERROR_PACKET_V6 - IPV6_HEADER_LEN - ICMP_HEADER_LEN]
    message = IcmpMessage(icmp_type, code, rest, quote)
    return message.build(6, bytes(view[24:40]), bytes(view[8:24]))


def _walk_v6(view: memoryview) -> tuple[int, int, int]:
    """(offset of the Next Header field naming the upper layer, its value, the upper layer's
    offset), skipping extension headers as `IpPacket.parse` does."""
    field, next_header, offset = 6, view[6], IPV6_HEADER_LEN
    # Bounded: each extension header is at least 8 bytes long.
    while next_header in _IPV6_SKIPPABLE and offset + 8 <= len(view):
        length = 8 if next_header == _IPV6_FRAGMENT else (view[offset + 1] + 1) * 8
        field, next_header = offset, view[offset]
        offset += length
    return field, next_header, offset


def _next_header_field(view: memoryview) -> int:
    return _walk_v6(view)[0]


def _icmpv6_type(view: memoryview) -> int | None:
    _field, next_header, offset = _walk_v6(view)
    if next_header != PROTO_ICMPV6 or offset >= len(view):
        return None
    return view[offset]


def _is_multicast(version: int, address: bytes) -> bool:
    if version == 4:
        return address[0] >= 224  # multicast 224/4, reserved 240/4, broadcast 255.255.255.255
    return address[0] == 0xFF


def _is_unicast_source(version: int, address: bytes) -> bool:
    if version == 4:
        return address[0] not in (0, 127) and address[0] < 224
    return address[0] != 0xFF and address != bytes(16)
