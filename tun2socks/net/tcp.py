"""TCP segments (RFC 9293 3.1) with their options: parse and build.

A segment is parsed from the upper-layer payload of an `IpPacket` and built back into a
whole IP packet by `build_tcp_packet`.  With checksum offload the TCP checksum field
carries only the pseudo-header sum and the kernel finishes it (see notes on the vnet
header); otherwise the full checksum is computed here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tun2socks.net.checksum import checksum, ones_sum, pseudo_header_sum
from tun2socks.net.ip import PROTO_TCP, IpPacket, MalformedPacket, build_ip_header

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

TCP_HEADER_LEN = 20

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2  # RFC 9293 3.2
OPT_WSCALE = 3  # RFC 7323 2
OPT_SACK_PERMITTED = 4  # RFC 2018
OPT_SACK = 5
OPT_TIMESTAMP = 8  # RFC 7323 3
MAX_WSCALE = 14  # RFC 7323 2.3

_HEADER = struct.Struct("!HHIIBBHHH")


class GsoPacket(bytes):
    """A TCP super-packet (offload mode) whose segments are smaller than the device's MTU
    allows: the device writes `gso_size` (the flow's MSS) into its vnet header, and the
    kernel cuts the payload into segments of that size.  Plain `bytes` packets are cut
    at the MTU."""

    def __new__(cls, packet: bytes, gso_size: int) -> GsoPacket:
        self = super().__new__(cls, packet)
        self.gso_size = gso_size
        return self

    gso_size: int


@dataclass(slots=True)
class TcpOptions:
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamp: tuple[int, int] | None = None
    sack_blocks: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, data: memoryview) -> TcpOptions:
        opts = cls()
        i, end = 0, len(data)
        while i < end:
            kind = data[i]
            if kind == OPT_END:
                break
            if kind == OPT_NOP:
                i += 1
                continue
            if i + 1 >= end or data[i + 1] < 2 or i + data[i + 1] > end:
                raise MalformedPacket("bad_tcp_option")
            length = data[i + 1]
            body = data[i + 2 : i + length]
            if kind == OPT_MSS and length == 4:
                opts.mss = int.from_bytes(body, "big")
            elif kind == OPT_WSCALE and length == 3:
                opts.wscale = min(body[0], MAX_WSCALE)
            elif kind == OPT_SACK_PERMITTED and length == 2:
                opts.sack_permitted = True
            elif kind == OPT_TIMESTAMP and length == 10:
                opts.timestamp = (int.from_bytes(body[:4], "big"), int.from_bytes(body[4:], "big"))
            elif kind == OPT_SACK and (length - 2) % 8 == 0:
                opts.sack_blocks = tuple(
                    (
                        int.from_bytes(body[j : j + 4], "big"),
                        int.from_bytes(body[j + 4 : j + 8], "big"),
                    )
                    for j in range(0, length - 2, 8)
                )
            i += length
        return opts

    def build(self) -> bytes:
        """Options in the order Linux uses, padded with NOPs to a multiple of 4 bytes."""
        out = bytearray()
        if self.mss is not None:
            out += struct.pack("!BBH", OPT_MSS, 4, self.mss)
        if self.sack_permitted and self.timestamp is not None:
            out += struct.pack("!BBBBII", OPT_SACK_PERMITTED, 2, OPT_TIMESTAMP, 10, *self.timestamp)
        else:
            if self.timestamp is not None:
                out += struct.pack("!BBBBII", OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, *self.timestamp)
            if self.sack_permitted:
                out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2))
        if self.wscale is not None:
            out += bytes((OPT_NOP, OPT_WSCALE, 3, self.wscale))
        if self.sack_blocks:
            out += bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(self.sack_blocks)))
            for left, right in self.sack_blocks:
                out += struct.pack("!II", left, right)
        return bytes(out)


@dataclass(slots=True)
class TcpSegment:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes | memoryview = b""
    options: TcpOptions = field(default_factory=TcpOptions)
    urgent: int = 0

    @classmethod
    def parse(cls, packet: IpPacket, checksum_trusted: bool = False) -> TcpSegment:
        """Parse the TCP segment carried by `packet`, verifying its checksum unless trusted."""
        data = packet.payload
        if len(data) < TCP_HEADER_LEN:
            raise MalformedPacket("truncated_tcp")
        sport, dport, seq, ack, off, flags, window, _csum, urgent = _HEADER.unpack_from(data)
        header_len = (off >> 4) * 4
        if header_len < TCP_HEADER_LEN or header_len > len(data):
            raise MalformedPacket("bad_tcp_offset")
        if not checksum_trusted:
            initial = pseudo_header_sum(packet.src, packet.dst, PROTO_TCP, len(data))
            if ones_sum(data, initial) != 0xFFFF:
                raise MalformedPacket("bad_tcp_checksum")
        options = (
            TcpOptions.parse(data[TCP_HEADER_LEN:header_len])
            if header_len > TCP_HEADER_LEN
            else TcpOptions()
        )
        return cls(sport, dport, seq, ack, flags, window, data[header_len:], options, urgent)

    @property
    def seq_len(self) -> int:
        """Sequence space the segment occupies: payload plus one for SYN and for FIN."""
        return len(self.payload) + (self.flags & SYN) // SYN + (self.flags & FIN)

    def build(self, version: int, src: bytes, dst: bytes, *, offload: bool = False) -> bytes:
        """The whole IP packet carrying this segment from `src` to `dst`."""
        return build_tcp_packet(
            version,
            src,
            dst,
            pseudo_header_sum(src, dst, PROTO_TCP, 0),
            self.src_port,
            self.dst_port,
            self.seq,
            self.ack,
            self.flags,
            self.window,
            self.options.build(),
            self.payload,
            offload=offload,
            urgent=self.urgent,
        )


def build_tcp_packet(
    version: int,
    src: bytes,
    dst: bytes,
    address_sum: int,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes,
    payload: bytes | memoryview,
    *,
    offload: bool,
    urgent: int = 0,
) -> bytes:
    """The hot path: one IP packet with one TCP segment.

    `address_sum` is `pseudo_header_sum(src, dst, PROTO_TCP, 0)`, computed once per flow.
    """
    header_len = TCP_HEADER_LEN + len(options)
    tcp_len = header_len + len(payload)
    pseudo = address_sum + tcp_len
    header = _HEADER.pack(
        src_port, dst_port, seq, ack, (header_len // 4) << 4, flags, window, 0, urgent
    )
    if options:
        header += options
    if offload:
        # The kernel completes the checksum: it expects the folded pseudo-header sum.
        csum = ones_sum(b"", pseudo)
    else:
        csum = checksum(payload, ones_sum(header, pseudo)) if payload else checksum(header, pseudo)
    header = header[:16] + csum.to_bytes(2, "big") + header[18:]
    return b"".join((build_ip_header(version, src, dst, PROTO_TCP, tcp_len), header, payload))
