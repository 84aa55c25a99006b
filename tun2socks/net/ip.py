"""IPv4 (RFC 791) and IPv6 (RFC 8200) headers: parse and build.

Addresses stay raw `bytes` (4 or 16) inside the stack: they hash fast and need no
conversion per packet.  `ipaddress` objects are made only at the edge, for events.
Parsing never raises on bad input from the wire: it raises `MalformedPacket`, which the
stack counts and drops.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tun2socks.net.checksum import checksum

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
DEFAULT_TTL = 64

# RFC 8200 4.1: extension headers a host skips to reach the upper layer.
_IPV6_SKIPPABLE = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT = 44
_IPV6_ROUTING = 43
_IPV6_NO_NEXT = 59

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")


class MalformedPacket(ValueError):
    """Bytes from the wire that do not form a packet we accept; `reason` names the drop counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class IpPacket:
    """One IP packet: the fields the stack needs and the upper-layer payload.

    `fragment` is True for IPv4 fragments and IPv6 packets with a fragment header;
    reassembly is not done here.
    """

    version: int
    src: bytes
    dst: bytes
    protocol: int
    ttl: int
    payload: memoryview
    fragment: bool = False

    @classmethod
    def parse(cls, data: bytes | memoryview) -> IpPacket:
        view = memoryview(data)
        if not view:
            raise MalformedPacket("empty")
        version = view[0] >> 4
        if version == 4:
            return cls._parse_v4(view)
        if version == 6:
            return cls._parse_v6(view)
        raise MalformedPacket("bad_ip_version")

    @classmethod
    def _parse_v4(cls, view: memoryview) -> IpPacket:
        if len(view) < IPV4_HEADER_LEN:
            raise MalformedPacket("truncated_ip")
        vihl, _tos, total_len, _ident, frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(view)
        ihl = (vihl & 0x0F) * 4
        if ihl < IPV4_HEADER_LEN or total_len < ihl or total_len > len(view):
            raise MalformedPacket("bad_ip_length")
        if checksum(view[:ihl]) != 0:
            raise MalformedPacket("bad_ip_checksum")
        # Fragment offset or More-Fragments set (RFC 791 3.1); DF (0x4000) is fine.
        fragment = (frag & 0x3FFF) != 0
        return cls(4, src, dst, proto, ttl, view[ihl:total_len], fragment)

    @classmethod
    def _parse_v6(cls, view: memoryview) -> IpPacket:
        if len(view) < IPV6_HEADER_LEN:
            raise MalformedPacket("truncated_ip")
        _vtcfl, payload_len, next_header, hop_limit, src, dst = _IPV6.unpack_from(view)
        end = IPV6_HEADER_LEN + payload_len
        if end > len(view):
            raise MalformedPacket("bad_ip_length")
        offset = IPV6_HEADER_LEN
        fragment = False
        # Bounded: each extension header is at least 8 bytes long.
        while next_header in _IPV6_SKIPPABLE or next_header == _IPV6_FRAGMENT:
            if offset + 8 > end:
                raise MalformedPacket("bad_ipv6_extension")
            if next_header == _IPV6_FRAGMENT:
                # What follows is the fragmentable part, readable only once reassembled
                # (RFC 8200 4.5): in a non-first fragment it is just data.
                fragment = True
                next_header = view[offset]
                offset += 8
                break
            if next_header == _IPV6_ROUTING and view[offset + 3]:
                # Segments left: we are not the final destination.  No routing type is
                # processed here, Type 0 included (RFC 5095 3, RFC 8200 4.4).
                raise MalformedPacket("ipv6_routing_header")
            next_header = view[offset]
            offset += (view[offset + 1] + 1) * 8
        if offset > end:
            raise MalformedPacket("bad_ipv6_extension")
        if next_header == _IPV6_NO_NEXT:
            raise MalformedPacket("no_next_header")
        return cls(6, src, dst, next_header, hop_limit, view[offset:end], fragment)


def build_ip_header(version: int, src: bytes, dst: bytes, protocol: int, payload_len: int) -> bytes:
    """An IP header for a payload of `payload_len` bytes (IPv4 with DF, checksum filled in)."""
    if version == 4:
        total = IPV4_HEADER_LEN + payload_len
        header = _IPV4.pack(0x45, 0, total, 0, 0x4000, DEFAULT_TTL, protocol, 0, src, dst)
        csum = checksum(header)
        return header[:10] + csum.to_bytes(2, "big") + header[12:]
    return _IPV6.pack(0x60000000, payload_len, protocol, DEFAULT_TTL, src, dst)
