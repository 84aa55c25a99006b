"""Path MTU discovery: which flow an ICMP "too big" message is about (RFC 1191, RFC 8201).

We set DF on every IPv4 packet; a router on a narrower path answers a packet that does
not fit with ICMP "fragmentation needed" (type 3 code 4, the next-hop MTU in the header)
or ICMPv6 "packet too big" (type 2), quoting the start of our packet.  `parse_too_big`
reads the quoted IP and TCP headers (our own, so without options or extension headers)
and returns the flow's 4-tuple as the stack keys it, the quoted sequence number (which
the flow checks against what it has in flight: RFC 5927 4.1) and the MTU.
"""

from __future__ import annotations

import struct

from tun2socks.net.icmp import IcmpMessage
from tun2socks.net.ip import IPV4_HEADER_LEN, IPV6_HEADER_LEN, PROTO_TCP, IpPacket

ICMPV4_DEST_UNREACHABLE = 3
ICMPV4_FRAGMENTATION_NEEDED = 4
ICMPV6_PACKET_TOO_BIG = 2

FourTuple = tuple[bytes, int, bytes, int]  # client address, client port, server address, port

_PORTS_SEQ = struct.Struct("!HHI")


def is_too_big(packet: IpPacket) -> bool:
    """A cheap look at the ICMP type before the message is parsed."""
    data = packet.payload
    if len(data) < 2:
        return False
    if packet.version == 4:
        return data[0] == ICMPV4_DEST_UNREACHABLE and data[1] == ICMPV4_FRAGMENTATION_NEEDED
    return data[0] == ICMPV6_PACKET_TOO_BIG


def parse_too_big(
    packet: IpPacket, checksum_trusted: bool = False
) -> tuple[FourTuple, int, int] | None:
    """(flow key, quoted TCP sequence number, MTU) of a too-big message about one of our TCP
    segments, or None.  Raises MalformedPacket on a bad checksum."""
    message = IcmpMessage.parse(packet, checksum_trusted)
    quoted = message.payload
    if packet.version == 4:
        mtu = int.from_bytes(message.rest_of_header[2:4], "big")
        if len(quoted) < IPV4_HEADER_LEN or quoted[0] >> 4 != 4 or quoted[9] != PROTO_TCP:
            return None
        ip_len = (quoted[0] & 0x0F) * 4
        src, dst = bytes(quoted[12:16]), bytes(quoted[16:20])
    else:
        mtu = int.from_bytes(message.rest_of_header, "big")
        if len(quoted) < IPV6_HEADER_LEN or quoted[0] >> 4 != 6 or quoted[6] != PROTO_TCP:
            return None
        ip_len = IPV6_HEADER_LEN
        src, dst = bytes(quoted[8:24]), bytes(quoted[24:40])
    if len(quoted) < ip_len + _PORTS_SEQ.size or src != packet.dst:
        return None  # not about a packet we sent from the address it is sent to
    sport, dport, seq = _PORTS_SEQ.unpack_from(quoted, ip_len)
    return (dst, dport, src, sport), seq, mtu
