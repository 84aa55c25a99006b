"""Packet cases shared by the atheris harness (fuzz_packets.py) and the hypothesis tests
(tests/unit/net/test_fuzz_codecs.py): templates (valid packets, UDP with bad lengths, fragments),
a checksum fixer and the checks.

`check_packet(raw, trusted)` is one fuzz iteration: parsers raise nothing but MalformedPacket;
what parses builds back to the same fields; `Stack.receive_packet` never raises and whatever it
sends parses; an ICMP destination-unreachable can be built about any packet of 20+ bytes.
`check_fragments(pieces, trusted)` feeds a set of fragments into one stack.
"""

from __future__ import annotations

import contextlib
import random

from tun2socks.net.checksum import checksum, pseudo_header_sum
from tun2socks.net.events import DatagramReceived
from tun2socks.net.fragments import Fragmenter
from tun2socks.net.icmp import IcmpMessage, destination_unreachable
from tun2socks.net.ip import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IpPacket,
    MalformedPacket,
)
from tun2socks.net.stack import Stack, StackConfig
from tun2socks.net.tcp import ACK, SYN, TcpOptions, TcpSegment
from tun2socks.net.udp import UdpDatagram

V4 = (bytes((198, 18, 0, 2)), bytes((192, 0, 2, 80)))
V6 = (bytes.fromhex("fd00007f" + "00" * 11 + "02"), bytes.fromhex("20010db8" + "00" * 11 + "80"))
OPTIONS = TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(1, 2))


def _templates() -> list[bytes]:
    out = []
    for version, (src, dst) in ((4, V4), (6, V6)):
        out.append(
            TcpSegment(40000, 80, 1000, 0, SYN, 65535, options=OPTIONS).build(version, src, dst)
        )
        out.append(TcpSegment(40000, 80, 1001, 5, ACK, 512, b"data" * 8).build(version, src, dst))
        out.append(UdpDatagram(5353, 53, b"\x12\x34\x01\x00" + bytes(12)).build(version, src, dst))
        echo = 8 if version == 4 else 128
        out.append(IcmpMessage(echo, 0, b"\x00\x01\x00\x02", b"ping").build(version, src, dst))
    # IPv6 with a hop-by-hop header in front of TCP.
    syn6 = out[4]
    ext = bytes((syn6[6], 0)) + bytes(6)
    plen = int.from_bytes(syn6[4:6], "big") + len(ext)
    out.append(syn6[:4] + plen.to_bytes(2, "big") + b"\x00" + syn6[7:40] + ext + syn6[40:])
    return out


def _bad_udp_lengths() -> list[bytes]:
    """UDP over IPv4 whose length field disagrees with the IP payload: longer (an error),
    below the header (an error), shorter (trailing padding, trimmed like Linux does)."""
    good = bytearray(UdpDatagram(5353, 53, b"q" * 24).build(4, *V4))
    out = []
    for length in (len(good) - 20 + 9, 4):
        bad = bytearray(good)
        bad[24:26] = length.to_bytes(2, "big")
        out.append(bytes(bad))
    padded = good + bytes(6)
    padded[2:4] = len(padded).to_bytes(2, "big")
    padded[10:12] = b"\0\0"
    padded[10:12] = checksum(padded[:20]).to_bytes(2, "big")
    out.append(bytes(padded))
    return out


def _fragment_sets() -> list[list[bytes]]:
    """UDP datagrams cut into three fragments each, IPv4 and IPv6 (ours: the split is tested
    against scapy in test_fragments.py)."""
    out = []
    for version, (src, dst) in ((4, V4), (6, V6)):
        whole = UdpDatagram(40000, 7000, bytes(range(256)) * 5).build(version, src, dst)
        out.append(Fragmenter(FRAGMENT_MTU, random.Random(7)).split(whole))
    return out


FRAGMENT_MTU = 576
FRAGMENT_SETS = _fragment_sets()
VALID_TEMPLATES = _templates()
BAD_UDP_LENGTHS = _bad_udp_lengths()  # longer than the IP payload, below 8, padded
TEMPLATES = [
    *VALID_TEMPLATES,
    *BAD_UDP_LENGTHS,
    *(piece for pieces in FRAGMENT_SETS for piece in (pieces[0], pieces[-1])),
]


def fix_checksums(packet: bytearray) -> None:
    """Recompute the IPv4 header and the upper-layer checksum where the layout allows."""
    if not packet:
        return
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 0x0F) * 4
        if 20 <= ihl <= len(packet):
            packet[10:12] = b"\0\0"
            packet[10:12] = checksum(packet[:ihl]).to_bytes(2, "big")
            fix_l4(packet, ihl, bytes(packet[12:16]), bytes(packet[16:20]), packet[9], 4)
    elif version == 6 and len(packet) >= 40:
        fix_l4(packet, 40, bytes(packet[8:24]), bytes(packet[24:40]), packet[6], 6)


def fix_l4(packet: bytearray, start: int, src: bytes, dst: bytes, proto: int, version: int) -> None:
    offset = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2, PROTO_ICMPV6: 2}.get(proto)
    length = len(packet) - start
    if offset is None or length < offset + 2:
        return
    packet[start + offset : start + offset + 2] = b"\0\0"
    initial = 0 if proto == PROTO_ICMP else pseudo_header_sum(src, dst, proto, length)
    csum = checksum(bytes(packet[start:]), initial)
    packet[start + offset : start + offset + 2] = csum.to_bytes(2, "big")


def reparse(packet: IpPacket, trusted: bool) -> None:
    """Parse the upper layer; if it parses, build it again and check the fields survive."""
    src, dst, version = packet.src, packet.dst, packet.version
    if packet.protocol == PROTO_TCP:
        seg = TcpSegment.parse(packet, trusted)
        again = TcpSegment.parse(IpPacket.parse(seg.build(version, src, dst)))
        fields = ("src_port", "dst_port", "seq", "ack", "flags", "window", "urgent")
        assert all(getattr(seg, f) == getattr(again, f) for f in fields), (seg, again)
        assert bytes(seg.payload) == bytes(again.payload)
        assert (
            TcpSegment.parse(IpPacket.parse(again.build(version, src, dst))).options
            == again.options
        )
    elif packet.protocol == PROTO_UDP:
        dgram = UdpDatagram.parse(packet, trusted)
        again = UdpDatagram.parse(IpPacket.parse(dgram.build(version, src, dst)))
        assert (dgram.src_port, dgram.dst_port, bytes(dgram.payload)) == (
            again.src_port, again.dst_port, bytes(again.payload),
        )  # fmt: skip
    elif packet.protocol in (PROTO_ICMP, PROTO_ICMPV6):
        msg = IcmpMessage.parse(packet, trusted)
        again = IcmpMessage.parse(IpPacket.parse(msg.build(version, src, dst)))
        assert (msg.type, msg.code, bytes(msg.payload)) == (
            again.type,
            again.code,
            bytes(again.payload),
        )


def parse_output(data: bytes) -> None:
    """What the stack sends must parse, checksums included (fragments: the IP header only)."""
    packet = IpPacket.parse(data)
    if packet.fragment:
        return
    if packet.protocol == PROTO_TCP:
        TcpSegment.parse(packet)
    elif packet.protocol == PROTO_UDP:
        UdpDatagram.parse(packet)
    else:
        assert packet.protocol in (PROTO_ICMP, PROTO_ICMPV6), packet.protocol
        IcmpMessage.parse(packet)


def check_fragments(pieces: list[bytes], trusted: bool) -> None:
    """Fragments (mutated, reordered, duplicated or missing) into one stack: nothing raises,
    what comes out parses, a datagram is whole, and once the reassembly timer has run out no
    incomplete datagram is left."""
    stack = Stack(StackConfig(), random.Random(0))
    for piece in pieces:
        stack.receive_packet(piece, 0.0, trusted)
    for out in stack.packets_to_send(0.0):
        parse_output(out)
    while (event := stack.next_event()) is not None:
        if isinstance(event, DatagramReceived):
            assert len(event.payload) <= 0xFFFF, len(event.payload)
    deadline = stack.get_timer()
    if deadline is not None:
        stack.handle_timer(deadline)
    assert stack.ip_stats()["fragments_pending"] == 0, stack.ip_stats()
    assert stack.get_timer() is None


def check_packet(raw: bytes, trusted: bool) -> None:
    with contextlib.suppress(MalformedPacket):
        reparse(IpPacket.parse(raw), trusted)
    stack = Stack(StackConfig(), random.Random(0))
    stack.receive_packet(raw, 0.0, trusted)
    for out in stack.packets_to_send(0.0):
        parse_output(out)
    while stack.next_event() is not None:
        pass
    if len(raw) >= 20 and raw[0] >> 4 in (4, 6) and (raw[0] >> 4 == 4 or len(raw) >= 40):
        IpPacket.parse(destination_unreachable(raw, 3))
