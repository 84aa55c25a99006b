"""UDP datagrams (RFC 768): parse and build.

A datagram is parsed from the upper-layer payload of an `IpPacket` and built back into a
whole IP packet.  The checksum is optional over IPv4 (0 means "none") and mandatory over
IPv6 (RFC 8200 8.1).  With checksum offload the checksum field carries only the
pseudo-header sum and the kernel finishes it, as for TCP.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tun2socks.net.checksum import ZERO_CHECKSUM_UDP, checksum, ones_sum, pseudo_header_sum
from tun2socks.net.ip import (
    IPV4_HEADER_LEN,
    PROTO_UDP,
    IpPacket,
    MalformedPacket,
    build_ip_header,
)

UDP_HEADER_LEN = 8
# The largest payload the 16-bit length fields allow (IPv4's total length is the tighter).
MAX_UDP_PAYLOAD_V4 = 0xFFFF - IPV4_HEADER_LEN - UDP_HEADER_LEN
MAX_UDP_PAYLOAD_V6 = 0xFFFF - UDP_HEADER_LEN

_HEADER = struct.Struct("!HHHH")


@dataclass(slots=True)
class UdpDatagram:
    src_port: int
    dst_port: int
    payload: bytes | memoryview = b""

    @classmethod
    def parse(cls, packet: IpPacket, checksum_trusted: bool = False) -> UdpDatagram:
        """Parse the UDP datagram carried by `packet`, verifying its checksum unless trusted."""
        data = packet.payload
        if len(data) < UDP_HEADER_LEN:
            raise MalformedPacket("truncated_udp")
        sport, dport, length, csum = _HEADER.unpack_from(data)
        # Like Linux: a length beyond the IP payload is an error, a shorter one trims padding.
        if length < UDP_HEADER_LEN or length > len(data):
            raise MalformedPacket("bad_udp_length")
        data = data[:length]
        if csum == 0:
            if packet.version == 6:
                raise MalformedPacket("udp_zero_checksum_v6")  # RFC 8200 8.1
        elif not checksum_trusted:
            initial = pseudo_header_sum(packet.src, packet.dst, PROTO_UDP, length)
            if ones_sum(data, initial) != 0xFFFF:
                raise MalformedPacket("bad_udp_checksum")
        return cls(sport, dport, data[UDP_HEADER_LEN:])

    def build(self, version: int, src: bytes, dst: bytes, *, offload: bool = False) -> bytes:
        """The whole IP packet carrying this datagram from `src` to `dst`."""
        limit = MAX_UDP_PAYLOAD_V4 if version == 4 else MAX_UDP_PAYLOAD_V6
        if len(self.payload) > limit:
            raise ValueError(f"UDP payload of {len(self.payload)} bytes exceeds {limit}")
        length = UDP_HEADER_LEN + len(self.payload)
        pseudo = pseudo_header_sum(src, dst, PROTO_UDP, length)
        if offload:
            # The kernel completes the checksum from the folded pseudo-header sum; that sum
            # is never 0 because the protocol number is part of it.
            csum = pseudo
        else:
            header = _HEADER.pack(self.src_port, self.dst_port, length, 0)
            csum = checksum(self.payload, ones_sum(header, pseudo)) or ZERO_CHECKSUM_UDP
        header = _HEADER.pack(self.src_port, self.dst_port, length, csum)
        return b"".join(
            (build_ip_header(version, src, dst, PROTO_UDP, length), header, self.payload)
        )
