"""ICMPv4 (RFC 792) and ICMPv6 (RFC 4443) messages: parse and build, plus the two
messages the stack originates: echo replies and destination-unreachable errors.

One type serves both versions; the IP version decides the protocol number and the
checksum: ICMPv6's covers the pseudo-header (RFC 4443 2.3), ICMPv4's covers the message
only.  Whether an error may be sent at all (not about an ICMP error, a non-first
fragment, a broadcast or multicast source: RFC 1122 3.2.2, RFC 4443 2.4 e) is the
caller's decision; the builders here only format.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tun2socks.net.checksum import checksum, ones_sum, pseudo_header_sum
from tun2socks.net.ip import (
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    PROTO_ICMP,
    PROTO_ICMPV6,
    IpPacket,
    MalformedPacket,
    build_ip_header,
)

ICMP_HEADER_LEN = 8

ICMPV4_ECHO_REPLY = 0
ICMPV4_DEST_UNREACHABLE = 3
ICMPV4_ECHO_REQUEST = 8
ICMPV6_DEST_UNREACHABLE = 1
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

# Destination-unreachable codes (RFC 792, RFC 1812 5.2.7.1; RFC 4443 3.1).
ICMPV4_NET_UNREACHABLE = 0
ICMPV4_HOST_UNREACHABLE = 1
ICMPV4_PORT_UNREACHABLE = 3
ICMPV4_FRAGMENTATION_NEEDED = 4  # RFC 1191: the next-hop MTU goes in rest_of_header
ICMPV4_ADMIN_PROHIBITED = 13
ICMPV6_NO_ROUTE = 0
ICMPV6_ADMIN_PROHIBITED = 1
ICMPV6_ADDRESS_UNREACHABLE = 3
ICMPV6_PORT_UNREACHABLE = 4

# An error message must not exceed these sizes (RFC 1812 4.3.2.3; RFC 4443 2.4 c).
MAX_ERROR_PACKET_V4 = 576
MAX_ERROR_PACKET_V6 = 1280

_HEADER = struct.Struct("!BBH4s")


@dataclass(slots=True)
class IcmpMessage:
    type: int
    code: int
    rest_of_header: bytes = bytes(4)  # echo: identifier and sequence number
    payload: bytes | memoryview = b""

    @classmethod
    def parse(cls, packet: IpPacket, checksum_trusted: bool = False) -> IcmpMessage:
        """Parse the ICMP (v4) or ICMPv6 (v6) message carried by `packet`."""
        data = packet.payload
        if len(data) < ICMP_HEADER_LEN:
            raise MalformedPacket("truncated_icmp")
        if not checksum_trusted:
            initial = _pseudo_sum(packet.version, packet.src, packet.dst, len(data))
            if ones_sum(data, initial) != 0xFFFF:
                raise MalformedPacket("bad_icmp_checksum")
        icmp_type, code, _csum, rest = _HEADER.unpack_from(data)
        return cls(icmp_type, code, rest, data[ICMP_HEADER_LEN:])

    def build(self, version: int, src: bytes, dst: bytes) -> bytes:
        """The whole IP packet carrying this message from `src` to `dst`."""
        if len(self.rest_of_header) != 4:
            raise ValueError("rest_of_header must be 4 bytes")
        length = ICMP_HEADER_LEN + len(self.payload)
        header = _HEADER.pack(self.type, self.code, 0, self.rest_of_header)
        initial = ones_sum(header, _pseudo_sum(version, src, dst, length))
        csum = checksum(self.payload, initial)
        header = header[:2] + csum.to_bytes(2, "big") + header[4:]
        protocol = PROTO_ICMP if version == 4 else PROTO_ICMPV6
        return b"".join(
            (build_ip_header(version, src, dst, protocol, length), header, self.payload)
        )


def _pseudo_sum(version: int, src: bytes, dst: bytes, length: int) -> int:
    return 0 if version == 4 else pseudo_header_sum(src, dst, PROTO_ICMPV6, length)


def echo_reply_for(packet: IpPacket, msg: IcmpMessage) -> bytes:
    """The reply to the echo request `msg` carried by `packet` (same id, sequence, data)."""
    request, reply = (
        (ICMPV4_ECHO_REQUEST, ICMPV4_ECHO_REPLY)
        if packet.version == 4
        else (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
    )
    if msg.type != request or msg.code != 0:
        raise ValueError(f"not an echo request: type {msg.type} code {msg.code}")
    answer = IcmpMessage(reply, 0, msg.rest_of_header, msg.payload)
    return answer.build(packet.version, packet.dst, packet.src)


def destination_unreachable(
    original: bytes | memoryview, code: int, *, src: bytes | None = None, mtu: int = 0
) -> bytes:
    """A destination-unreachable error about the IP packet `original`, sent back to its source.

    `src` defaults to the original destination (the error looks like it comes from the
    host that was unreachable); `mtu` fills the next-hop MTU for ICMPv4 code 4.  As much
    of the original is quoted as fits in 576 (IPv4) or 1280 (IPv6) bytes.
    """
    view = memoryview(original)
    version = view[0] >> 4 if view else 0
    if version == 4 and len(view) >= IPV4_HEADER_LEN:
        orig_src, orig_dst = bytes(view[12:16]), bytes(view[16:20])
        icmp_type, limit = ICMPV4_DEST_UNREACHABLE, MAX_ERROR_PACKET_V4 - IPV4_HEADER_LEN
        rest = struct.pack("!HH", 0, mtu if code == ICMPV4_FRAGMENTATION_NEEDED else 0)
    elif version == 6 and len(view) >= IPV6_HEADER_LEN:
        orig_src, orig_dst = bytes(view[8:24]), bytes(view[24:40])
        icmp_type, limit = ICMPV6_DEST_UNREACHABLE, MAX_ERROR_PACKET_V6 - IPV6_HEADER_LEN
        rest = bytes(4)
    else:
        raise MalformedPacket("truncated_ip")
    quote = view[: limit - ICMP_HEADER_LEN]
    message = IcmpMessage(icmp_type, code, rest, quote)
    return message.build(version, orig_dst if src is None else src, orig_src)
