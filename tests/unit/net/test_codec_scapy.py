"""The wire codec cross-checked with scapy, an independent implementation: what we build, scapy
reads (and recomputes the same checksums); what scapy builds, we read."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
)
from scapy.packet import Packet, Raw

from tests.support.codec_cases import (
    ADDRS,
    DST4,
    DST6,
    SRC4,
    SRC6,
    payloads,
    scapy_parse,
    tcp_segments,
    u16,
    u32,
    udp_datagrams,
    versions,
)
from tun2socks.net.icmp import (
    ICMPV4_ECHO_REPLY,
    ICMPV4_ECHO_REQUEST,
    ICMPV6_ECHO_REQUEST,
    IcmpMessage,
)
from tun2socks.net.ip import (
    PROTO_TCP,
    PROTO_UDP,
    IpPacket,
)
from tun2socks.net.tcp import TcpOptions, TcpSegment
from tun2socks.net.udp import UdpDatagram

SCAPY = settings(max_examples=60, deadline=None)


# --- scapy cross-check: ours -> scapy ---------------------------------------------------


def scapy_options(options: TcpOptions) -> dict[str, object]:
    """Scapy's parsed options as a dict: the order and padding are the encoder's choice."""
    return {name: value for name, value in options_list(options)}


def options_list(options: TcpOptions) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    if options.mss is not None:
        out.append(("MSS", options.mss))
    if options.wscale is not None:
        out.append(("WScale", options.wscale))
    if options.sack_permitted:
        out.append(("SAckOK", b""))
    if options.timestamp is not None:
        out.append(("Timestamp", options.timestamp))
    if options.sack_blocks:
        out.append(("SAck", tuple(edge for block in options.sack_blocks for edge in block)))
    return out


def scapy_recomputes_same_bytes(data: bytes, layer: type, field: str) -> bool:
    """Scapy, told to compute the checksums itself, produces exactly our bytes."""
    pkt = scapy_parse(data)
    delattr(pkt[layer], field)
    if IP in pkt:
        del pkt[IP].chksum
    return bytes(pkt) == data


@SCAPY
@given(version=versions, segment=tcp_segments)
def test_scapy_reads_our_tcp_segments(version: int, segment: TcpSegment) -> None:
    src, dst = ADDRS[version]
    data = segment.build(version, src, dst)
    tcp = scapy_parse(data)[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (
        segment.src_port,
        segment.dst_port,
        segment.seq,
        segment.ack,
    )
    assert (int(tcp.flags), tcp.window, bytes(tcp.payload)) == (
        segment.flags,
        segment.window,
        bytes(segment.payload),
    )
    parsed = {name: value for name, value in tcp.options if name not in ("NOP", "EOL")}
    assert parsed == scapy_options(segment.options)
    assert scapy_recomputes_same_bytes(data, TCP, "chksum")


@SCAPY
@given(version=versions, datagram=udp_datagrams)
def test_scapy_reads_our_udp_datagrams(version: int, datagram: UdpDatagram) -> None:
    data = datagram.build(version, *ADDRS[version])
    udp = scapy_parse(data)[UDP]
    assert (udp.sport, udp.dport, udp.len, bytes(udp.payload)) == (
        datagram.src_port,
        datagram.dst_port,
        8 + len(datagram.payload),
        bytes(datagram.payload),
    )
    assert scapy_recomputes_same_bytes(data, UDP, "chksum")


@SCAPY
@given(
    echo_type=st.sampled_from([ICMPV4_ECHO_REQUEST, ICMPV4_ECHO_REPLY]),
    ident=u16,
    seq=u16,
    payload=payloads,
)
def test_scapy_reads_our_icmpv4_echo(echo_type: int, ident: int, seq: int, payload: bytes) -> None:
    data = IcmpMessage(echo_type, 0, struct.pack("!HH", ident, seq), payload).build(4, SRC4, DST4)
    icmp = scapy_parse(data)[ICMP]
    assert (icmp.type, icmp.code, icmp.id, icmp.seq, bytes(icmp.payload)) == (
        echo_type,
        0,
        ident,
        seq,
        payload,
    )
    assert scapy_recomputes_same_bytes(data, ICMP, "chksum")


@SCAPY
@given(
    echo=st.sampled_from([(ICMPV6_ECHO_REQUEST, ICMPv6EchoRequest), (129, ICMPv6EchoReply)]),
    ident=u16,
    seq=u16,
    payload=payloads,
)
def test_scapy_reads_our_icmpv6_echo(
    echo: tuple[int, type], ident: int, seq: int, payload: bytes
) -> None:
    echo_type, layer = echo
    data = IcmpMessage(echo_type, 0, struct.pack("!HH", ident, seq), payload).build(6, SRC6, DST6)
    icmp = scapy_parse(data)[layer]
    assert (icmp.id, icmp.seq, icmp.data) == (ident, seq, payload)
    assert scapy_recomputes_same_bytes(data, layer, "cksum")


# --- scapy cross-check: scapy -> ours ---------------------------------------------------

scapy_option_lists = st.lists(
    st.sampled_from(["MSS", "WScale", "SAckOK", "Timestamp"]), unique=True
).flatmap(
    lambda names: st.tuples(
        *(
            {
                "MSS": st.tuples(st.just("MSS"), u16),
                "WScale": st.tuples(st.just("WScale"), st.integers(0, 14)),
                "SAckOK": st.just(("SAckOK", b"")),
                "Timestamp": st.tuples(st.just("Timestamp"), st.tuples(u32, u32)),
            }[name]
            for name in names
        )
    )
)


def scapy_ip(version: int, ttl: int) -> IP | IPv6:
    if version == 4:
        return IP(src=str(IPv4Address(SRC4)), dst=str(IPv4Address(DST4)), ttl=ttl)
    return IPv6(src=str(IPv6Address(SRC6)), dst=str(IPv6Address(DST6)), hlim=ttl)


@SCAPY
@given(
    version=versions,
    ttl=st.integers(1, 255),
    sport=u16,
    dport=u16,
    seq=u32,
    ack=u32,
    flags=st.integers(0, 0xFF),
    window=u16,
    options=scapy_option_lists,
    payload=payloads,
)
def test_we_read_scapy_tcp_segments(
    version: int,
    ttl: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: tuple[tuple[str, object], ...],
    payload: bytes,
) -> None:
    tcp = TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=window)
    tcp.options = list(options)
    data = bytes(scapy_ip(version, ttl) / tcp / Raw(payload))
    packet = IpPacket.parse(data)
    assert (packet.version, packet.ttl, packet.protocol) == (version, ttl, PROTO_TCP)
    segment = TcpSegment.parse(packet)
    assert (segment.src_port, segment.dst_port, segment.seq, segment.ack) == (
        sport,
        dport,
        seq,
        ack,
    )
    assert (segment.flags, segment.window, bytes(segment.payload)) == (flags, window, payload)
    assert scapy_options(segment.options) == dict(options)


@SCAPY
@given(version=versions, ttl=st.integers(1, 255), sport=u16, dport=u16, payload=payloads)
def test_we_read_scapy_udp_datagrams(
    version: int, ttl: int, sport: int, dport: int, payload: bytes
) -> None:
    packet = IpPacket.parse(bytes(scapy_ip(version, ttl) / UDP(sport=sport, dport=dport) / payload))
    assert (packet.ttl, packet.protocol) == (ttl, PROTO_UDP)
    assert UdpDatagram.parse(packet) == UdpDatagram(sport, dport, payload)


@SCAPY
@given(version=versions, ident=u16, seq=u16, payload=payloads)
def test_we_read_scapy_icmp_echo_requests(
    version: int, ident: int, seq: int, payload: bytes
) -> None:
    if version == 4:
        upper: Packet = ICMP(type=8, id=ident, seq=seq) / Raw(payload)
        echo_type = ICMPV4_ECHO_REQUEST
    else:
        upper = ICMPv6EchoRequest(id=ident, seq=seq, data=payload)
        echo_type = ICMPV6_ECHO_REQUEST
    packet = IpPacket.parse(bytes(scapy_ip(version, 64) / upper))
    expected = IcmpMessage(echo_type, 0, struct.pack("!HH", ident, seq), payload)
    assert IcmpMessage.parse(packet) == expected
