"""Read the TCP segments of a classic pcap file (no I/O beyond the bytes given; no scapy).

Enough for the connection timeline: tun2socks' own capture of its TUN (`--pcap`, LINKTYPE_RAW:
bare IP packets) and tshark's capture of a veth (`-F pcap`, LINKTYPE_ETHERNET). IPv4 and IPv6
(without extension headers); other packets are skipped. Timestamps are seconds since the epoch
(both captures use the same clock, so they merge by timestamp).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
_MAGIC = {  # magic number -> (byte order, timestamp fraction per second)
    0xA1B2C3D4: ("<", 1e6),
    0xA1B23C4D: ("<", 1e9),
    0xD4C3B2A1: (">", 1e6),
    0x4D3CB2A1: (">", 1e9),
}
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
PROTO_TCP = 6

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


@dataclass(frozen=True)
class Segment:
    time: float  # seconds since the epoch
    src: str
    sport: int
    dst: str
    dport: int
    flags: int
    seq: int
    payload: bytes

    @property
    def syn(self) -> bool:
        return bool(self.flags & SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def ack(self) -> bool:
        return bool(self.flags & ACK)

    @property
    def rst(self) -> bool:
        return bool(self.flags & RST)


class PcapError(ValueError):
    pass


def read_segments(data: bytes) -> list[Segment]:
    """Every TCP segment of a pcap file's bytes, in file order."""
    if len(data) < 24:
        raise PcapError("shorter than a pcap header")
    magic = struct.unpack("<I", data[:4])[0]
    if magic not in _MAGIC:
        raise PcapError(f"not a classic pcap file (magic {magic:#x}; pcapng is not read)")
    order, per_second = _MAGIC[magic]
    linktype = struct.unpack(order + "I", data[20:24])[0] & 0x0FFFFFFF
    if linktype not in (LINKTYPE_ETHERNET, LINKTYPE_RAW):
        raise PcapError(f"link type {linktype} is not read")
    record = struct.Struct(order + "IIII")
    segments = []
    offset = 24
    while offset + record.size <= len(data):
        seconds, fraction, captured, _ = record.unpack_from(data, offset)
        offset += record.size
        frame = data[offset : offset + captured]
        offset += captured
        packet = _ip_of(frame, linktype)
        segment = _tcp_of(packet, seconds + fraction / per_second) if packet else None
        if segment is not None:
            segments.append(segment)
    return segments


def _ip_of(frame: bytes, linktype: int) -> bytes | None:
    if linktype == LINKTYPE_RAW:
        return frame
    if len(frame) < 14:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    return frame[14:] if ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6) else None


def _tcp_of(packet: bytes, time: float) -> Segment | None:
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        header = (packet[0] & 0x0F) * 4
        total = struct.unpack("!H", packet[2:4])[0] or len(packet)  # 0: a TSO super-segment
        if packet[9] != PROTO_TCP:
            return None
        src = str(ipaddress.IPv4Address(packet[12:16]))
        dst = str(ipaddress.IPv4Address(packet[16:20]))
        tcp = packet[header : min(total, len(packet))]
    elif version == 6 and len(packet) >= 40:
        if packet[6] != PROTO_TCP:
            return None
        src = str(ipaddress.IPv6Address(packet[8:24]))
        dst = str(ipaddress.IPv6Address(packet[24:40]))
        length = struct.unpack("!H", packet[4:6])[0] or len(packet) - 40
        tcp = packet[40 : 40 + length]
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    data_offset = (tcp[12] >> 4) * 4
    return Segment(time, src, sport, dst, dport, tcp[13], seq, tcp[data_offset:])
