"""The wire codec (tun2socks.net: checksum, ip, tcp, udp, icmp) byte for byte.

Golden bytes were produced once by scapy and checked field by field; the round-trip and
cross-check properties compare us with scapy as an independent implementation.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrFragment,
)
from scapy.packet import Packet, Raw

from tests.support import packet_cases
from tun2socks.net.checksum import checksum, ones_sum, pseudo_header_sum
from tun2socks.net.icmp import (
    ICMPV4_DEST_UNREACHABLE,
    ICMPV4_ECHO_REPLY,
    ICMPV4_ECHO_REQUEST,
    ICMPV4_FRAGMENTATION_NEEDED,
    ICMPV4_PORT_UNREACHABLE,
    ICMPV6_DEST_UNREACHABLE,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_PORT_UNREACHABLE,
    IcmpMessage,
    destination_unreachable,
    echo_reply_for,
)
from tun2socks.net.ip import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IpPacket,
    MalformedPacket,
)
from tun2socks.net.tcp import ACK, PSH, SYN, URG, TcpOptions, TcpSegment
from tun2socks.net.udp import UdpDatagram

SRC4 = IPv4Address("192.0.2.1").packed
DST4 = IPv4Address("198.51.100.2").packed
SRC6 = IPv6Address("2001:db8::1").packed
DST6 = IPv6Address("2001:db8::2").packed
ADDRS = {4: (SRC4, DST4), 6: (SRC6, DST6)}

SYN_OPTIONS = TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(0x11223344, 0))

# IPv4 (DF, TTL 64) 192.0.2.1:40000 -> 198.51.100.2:80, SYN seq 0x01020304, window 64240,
# options MSS 1460, SACK-permitted, timestamps (0x11223344, 0), NOP, window scale 7.
GOLDEN_SYN4 = bytes.fromhex(
    "4500003c0000400040064e85c0000201c6336402"
    "9c4000500102030400000000a002faf07bdb0000"
    "020405b40402080a112233440000000001030307"
)
# IPv6 (hop limit 64) [2001:db8::1]:40000 -> [2001:db8::2]:443, SYN seq 0xA1B2C3D4,
# window 64800, the same options with MSS 1440.
GOLDEN_SYN6 = bytes.fromhex(
    "6000000000280640"
    "20010db8000000000000000000000001"
    "20010db8000000000000000000000002"
    "9c4001bba1b2c3d400000000a002fd20a7950000"
    "020405a00402080a112233440000000001030307"
)
# IPv4 UDP 192.0.2.1:53000 -> 198.51.100.2:53, payload "hello".
GOLDEN_UDP4 = bytes.fromhex("450000210000400040114e95c0000201c6336402cf080035000d008d68656c6c6f")
# IPv6 UDP [2001:db8::1]:53000 -> [2001:db8::2]:53, payload "hello".
GOLDEN_UDP6 = bytes.fromhex(
    "60000000000d1140"
    "20010db8000000000000000000000001"
    "20010db8000000000000000000000002"
    "cf080035000d914f"
    "68656c6c6f"
)
# ICMPv4 echo request id 0x1234 seq 1 payload "ping".
GOLDEN_ECHO4 = bytes.fromhex("450000200000400040014ea6c0000201c6336402080006fa1234000170696e67")
# ICMPv6 echo request id 0x1234 seq 1 payload "ping".
GOLDEN_ECHO6 = bytes.fromhex(
    "60000000000c3a40"
    "20010db8000000000000000000000001"
    "20010db8000000000000000000000002"
    "8000333e12340001"
    "70696e67"
)

GOLDEN_SYN4_SEGMENT = TcpSegment(40000, 80, 0x01020304, 0, SYN, 64240, b"", SYN_OPTIONS)
GOLDEN_SYN6_SEGMENT = TcpSegment(
    40000, 443, 0xA1B2C3D4, 0, SYN, 64800, b"", TcpOptions(1440, 7, True, (0x11223344, 0))
)

GOLDEN_PACKETS: list[tuple[str, bytes, Callable[[IpPacket, bool], object]]] = [
    ("syn4", GOLDEN_SYN4, TcpSegment.parse),
    ("syn6", GOLDEN_SYN6, TcpSegment.parse),
    ("udp4", GOLDEN_UDP4, UdpDatagram.parse),
    ("udp6", GOLDEN_UDP6, UdpDatagram.parse),
    ("echo4", GOLDEN_ECHO4, IcmpMessage.parse),
    ("echo6", GOLDEN_ECHO6, IcmpMessage.parse),
]
GOLDEN_IDS = [name for name, _, _ in GOLDEN_PACKETS]


def naive_ones_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 section 4.1, word by word: the reference our fast version must match."""
    if len(data) % 2:
        data += b"\0"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def naive_checksum(data: bytes) -> int:
    return ~naive_ones_sum(data) & 0xFFFF


def pseudo_header(src: bytes, dst: bytes, protocol: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, protocol, length)
    return src + dst + struct.pack("!IxxxB", length, protocol)


def l4_of(packet: bytes) -> bytes:
    """The upper-layer bytes of a packet without IPv4 options or IPv6 extension headers."""
    if packet[0] >> 4 == 4:
        return packet[20 : struct.unpack_from("!H", packet, 2)[0]]
    return packet[40:]


def with_ipv4_header_checksum(packet: bytearray) -> bytes:
    ihl = (packet[0] & 0x0F) * 4
    packet[10:12] = b"\0\0"
    packet[10:12] = checksum(packet[:ihl]).to_bytes(2, "big")
    return bytes(packet)


# --- hypothesis strategies -------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
versions = st.sampled_from([4, 6])
payloads = st.binary(max_size=1500)
tcp_options = st.builds(
    TcpOptions,
    mss=st.none() | u16,
    wscale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    timestamp=st.none() | st.tuples(u32, u32),
    sack_blocks=st.lists(st.tuples(u32, u32), max_size=4).map(tuple),
).filter(lambda options: len(options.build()) <= 40)  # the data offset allows 40 bytes
tcp_segments = st.builds(
    TcpSegment,
    src_port=u16,
    dst_port=u16,
    seq=u32,
    ack=u32,
    flags=st.integers(0, 0xFF),
    window=u16,
    payload=payloads,
    options=tcp_options,
)
udp_datagrams = st.builds(UdpDatagram, src_port=u16, dst_port=u16, payload=payloads)
icmp_messages = st.builds(
    IcmpMessage,
    type=st.integers(0, 0xFF),
    code=st.integers(0, 0xFF),
    rest_of_header=st.binary(min_size=4, max_size=4),
    payload=payloads,
)
SCAPY = settings(max_examples=60, deadline=None)


# --- golden bytes ----------------------------------------------------------------------


def test_golden_ipv4_syn_with_all_options_is_built_byte_for_byte() -> None:
    assert GOLDEN_SYN4_SEGMENT.build(4, SRC4, DST4) == GOLDEN_SYN4


def test_golden_ipv6_syn_with_all_options_is_built_byte_for_byte() -> None:
    assert GOLDEN_SYN6_SEGMENT.build(6, SRC6, DST6) == GOLDEN_SYN6


def test_golden_ipv4_syn_parses_to_its_fields() -> None:
    packet = IpPacket.parse(GOLDEN_SYN4)
    assert (packet.version, packet.src, packet.dst, packet.protocol, packet.ttl) == (
        4,
        SRC4,
        DST4,
        PROTO_TCP,
        64,
    )
    assert not packet.fragment
    assert TcpSegment.parse(packet) == GOLDEN_SYN4_SEGMENT


def test_golden_ipv6_syn_parses_to_its_fields() -> None:
    packet = IpPacket.parse(GOLDEN_SYN6)
    assert (packet.version, packet.src, packet.dst, packet.protocol, packet.ttl) == (
        6,
        SRC6,
        DST6,
        PROTO_TCP,
        64,
    )
    assert TcpSegment.parse(packet) == GOLDEN_SYN6_SEGMENT


@pytest.mark.parametrize(("version", "golden"), [(4, GOLDEN_UDP4), (6, GOLDEN_UDP6)])
def test_golden_udp_datagram(version: int, golden: bytes) -> None:
    datagram = UdpDatagram(53000, 53, b"hello")
    assert datagram.build(version, *ADDRS[version]) == golden
    packet = IpPacket.parse(golden)
    assert packet.protocol == PROTO_UDP
    assert UdpDatagram.parse(packet) == datagram


@pytest.mark.parametrize(
    ("version", "golden", "echo_type", "protocol"),
    [
        (4, GOLDEN_ECHO4, ICMPV4_ECHO_REQUEST, PROTO_ICMP),
        (6, GOLDEN_ECHO6, ICMPV6_ECHO_REQUEST, PROTO_ICMPV6),
    ],
)
def test_golden_icmp_echo_request(
    version: int, golden: bytes, echo_type: int, protocol: int
) -> None:
    message = IcmpMessage(echo_type, 0, bytes.fromhex("12340001"), b"ping")
    assert message.build(version, *ADDRS[version]) == golden
    packet = IpPacket.parse(golden)
    assert packet.protocol == protocol
    assert IcmpMessage.parse(packet) == message


# --- round trips -----------------------------------------------------------------------


@given(version=versions, segment=tcp_segments)
def test_tcp_segment_round_trips(version: int, segment: TcpSegment) -> None:
    src, dst = ADDRS[version]
    packet = IpPacket.parse(segment.build(version, src, dst))
    assert (packet.version, packet.src, packet.dst, packet.protocol) == (version, src, dst, 6)
    assert TcpSegment.parse(packet) == segment


@given(options=tcp_options)
def test_tcp_options_round_trip(options: TcpOptions) -> None:
    encoded = options.build()
    assert len(encoded) % 4 == 0
    assert TcpOptions.parse(memoryview(encoded)) == options


def test_tcp_urgent_pointer_round_trips() -> None:
    segment = TcpSegment(1, 2, 3, 4, ACK | PSH | URG, 5, b"urgent", urgent=3)
    assert TcpSegment.parse(IpPacket.parse(segment.build(4, SRC4, DST4))).urgent == 3


@given(version=versions, datagram=udp_datagrams)
def test_udp_datagram_round_trips(version: int, datagram: UdpDatagram) -> None:
    src, dst = ADDRS[version]
    packet = IpPacket.parse(datagram.build(version, src, dst))
    assert (packet.version, packet.src, packet.dst, packet.protocol) == (version, src, dst, 17)
    assert UdpDatagram.parse(packet) == datagram


@given(version=versions, message=icmp_messages)
def test_icmp_message_round_trips(version: int, message: IcmpMessage) -> None:
    src, dst = ADDRS[version]
    packet = IpPacket.parse(message.build(version, src, dst))
    assert packet.protocol == (PROTO_ICMP if version == 4 else PROTO_ICMPV6)
    assert IcmpMessage.parse(packet) == message


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


def scapy_parse(data: bytes) -> IP | IPv6:
    return IP(data) if data[0] >> 4 == 4 else IPv6(data)


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


# --- checksum --------------------------------------------------------------------------

EDGE_CASES = [
    b"",
    b"\0",
    b"\0\0",
    bytes(1501),  # all zero: sum 0, checksum 0xFFFF
    b"\xff",
    b"\xff\xff",  # sum 0xFFFF ("negative zero"), checksum 0
    b"\xff" * 1501,
    b"\x00\x01\xff\xfe",  # a non-zero sum that is a multiple of 0xFFFF
    b"\xff\xff\xff\xff\x00",
    b"\x80\x00" * 4,  # carries out of bit 15 repeatedly
]


@pytest.mark.parametrize("data", EDGE_CASES, ids=lambda d: f"{d[:4].hex()}x{len(d)}")
def test_checksum_edge_cases_match_naive_reference(data: bytes) -> None:
    assert ones_sum(data) == naive_ones_sum(data)
    assert checksum(data) == naive_checksum(data)


@given(data=st.binary(max_size=3000), initial=st.integers(0, 0x3FFFF))
def test_checksum_matches_naive_reference(data: bytes, initial: int) -> None:
    assert ones_sum(data, initial) == naive_ones_sum(data, initial)
    assert checksum(data) == naive_checksum(data)
    assert checksum(memoryview(data)) == checksum(bytearray(data)) == naive_checksum(data)


@given(data=st.binary(min_size=2, max_size=200).filter(lambda d: len(d) % 2 == 0))
def test_data_with_its_checksum_appended_verifies(data: bytes) -> None:
    assert ones_sum(data + checksum(data).to_bytes(2, "big")) == 0xFFFF


@given(version=versions, protocol=st.sampled_from([6, 17, 58]), length=st.integers(0, 0xFFFF))
def test_pseudo_header_sum_matches_naive_reference(
    version: int, protocol: int, length: int
) -> None:
    src, dst = ADDRS[version]
    expected = naive_ones_sum(pseudo_header(src, dst, protocol, length))
    assert pseudo_header_sum(src, dst, protocol, length) == expected


# --- offload convention ----------------------------------------------------------------


def finish_partial_checksum(l4: bytes, field_offset: int) -> bytes:
    """What the kernel does with NEEDS_CSUM: sum from csum_start with the field as is, invert."""
    done = ~ones_sum(l4) & 0xFFFF
    return l4[:field_offset] + done.to_bytes(2, "big") + l4[field_offset + 2 :]


@given(version=versions, segment=tcp_segments)
def test_tcp_offload_field_holds_the_folded_pseudo_header_sum(
    version: int, segment: TcpSegment
) -> None:
    src, dst = ADDRS[version]
    l4 = l4_of(segment.build(version, src, dst, offload=True))
    field = struct.unpack_from("!H", l4, 16)[0]
    assert field == naive_ones_sum(pseudo_header(src, dst, PROTO_TCP, len(l4)))
    finished = finish_partial_checksum(l4, 16)
    assert finished == l4_of(segment.build(version, src, dst))


@given(version=versions, datagram=udp_datagrams)
def test_udp_offload_field_holds_the_folded_pseudo_header_sum(
    version: int, datagram: UdpDatagram
) -> None:
    src, dst = ADDRS[version]
    l4 = l4_of(datagram.build(version, src, dst, offload=True))
    field = struct.unpack_from("!H", l4, 6)[0]
    assert field == naive_ones_sum(pseudo_header(src, dst, PROTO_UDP, len(l4)))
    finished = finish_partial_checksum(l4, 6)
    assert ones_sum(finished, pseudo_header_sum(src, dst, PROTO_UDP, len(l4))) == 0xFFFF


@pytest.mark.parametrize("version", [4, 6])
def test_udp_computed_zero_checksum_is_sent_as_all_ones(version: int) -> None:
    src, dst = ADDRS[version]
    # Append the checksum of the datagram as a payload word: the new sum is 0xFFFF.
    first = UdpDatagram(1000, 2000, b"abcd\0\0").build(version, src, dst)
    tail = l4_of(first)[6:8]
    data = UdpDatagram(1000, 2000, b"abcd" + tail).build(version, src, dst)
    assert l4_of(data)[6:8] == b"\xff\xff"
    assert UdpDatagram.parse(IpPacket.parse(data)).payload == b"abcd" + tail


# --- truncation and garbage ------------------------------------------------------------


@pytest.mark.parametrize(("name", "golden", "parse"), GOLDEN_PACKETS, ids=GOLDEN_IDS)
def test_truncated_packets_raise_malformed(
    name: str, golden: bytes, parse: Callable[[IpPacket, bool], object]
) -> None:
    for length in range(len(golden)):
        with pytest.raises(MalformedPacket):
            parse(IpPacket.parse(golden[:length]), False)


@pytest.mark.parametrize(("name", "golden", "parse"), GOLDEN_PACKETS, ids=GOLDEN_IDS)
def test_truncated_upper_layers_raise_malformed(
    name: str, golden: bytes, parse: Callable[[IpPacket, bool], object]
) -> None:
    """An IP layer that is consistent but carries a cut-off header."""
    whole = IpPacket.parse(golden)
    header_len = {"syn": 40, "udp": 8, "echo": 8}[name[:-1]]
    for length in range(header_len):
        whole.payload = memoryview(l4_of(golden)[:length])
        for trusted in (False, True):
            with pytest.raises(MalformedPacket):
                parse(whole, trusted)


@settings(max_examples=300)
@given(version=versions, protocol=st.sampled_from([6, 17, 1, 58]), l4=st.binary(max_size=80))
def test_garbage_upper_layers_raise_only_malformed(version: int, protocol: int, l4: bytes) -> None:
    packet = IpPacket(version, *ADDRS[version], protocol, 64, memoryview(l4))
    parse = {6: TcpSegment.parse, 17: UdpDatagram.parse}.get(protocol, IcmpMessage.parse)
    for trusted in (False, True):
        with contextlib.suppress(MalformedPacket):
            parse(packet, trusted)


@settings(max_examples=300)
@given(data=st.binary(max_size=120), v4=st.booleans())
def test_garbage_ip_headers_raise_only_malformed(data: bytes, v4: bool) -> None:
    raw = bytearray(data)
    if v4 and len(raw) >= 20:
        raw[0] = 0x40 | (raw[0] & 0x0F)
        raw = bytearray(with_ipv4_header_checksum(raw)) if (raw[0] & 0x0F) * 4 <= len(raw) else raw
    with contextlib.suppress(MalformedPacket):
        IpPacket.parse(bytes(raw))


# --- corrupt checksums -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "golden", "parse"), GOLDEN_PACKETS, ids=GOLDEN_IDS)
def test_any_flipped_bit_in_the_upper_layer_is_rejected(
    name: str, golden: bytes, parse: Callable[[IpPacket, bool], object]
) -> None:
    # Header fields checked first (UDP length, TCP data offset) may fail with another reason.
    start = len(golden) - len(l4_of(golden))
    for index in range(start, len(golden)):
        for bit in range(8):
            corrupt = bytearray(golden)
            corrupt[index] ^= 1 << bit
            with pytest.raises(MalformedPacket):
                parse(IpPacket.parse(bytes(corrupt)), False)


@pytest.mark.parametrize(("name", "golden", "parse"), GOLDEN_PACKETS, ids=GOLDEN_IDS)
def test_flipped_bit_in_the_checksum_field_fails_the_checksum(
    name: str, golden: bytes, parse: Callable[[IpPacket, bool], object]
) -> None:
    field = len(golden) - len(l4_of(golden)) + {"syn": 16, "udp": 6, "echo": 2}[name[:-1]]
    for bit in range(16):
        corrupt = bytearray(golden)
        corrupt[field + bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(MalformedPacket, match="checksum"):
            parse(IpPacket.parse(bytes(corrupt)), False)


@pytest.mark.parametrize(("name", "golden", "parse"), GOLDEN_PACKETS, ids=GOLDEN_IDS)
def test_corrupt_checksum_is_accepted_when_trusted(
    name: str, golden: bytes, parse: Callable[[IpPacket, bool], object]
) -> None:
    corrupt = bytearray(golden)
    corrupt[-1] ^= 0xFF  # last payload byte (options end in wscale 7 for the SYNs)
    packet = IpPacket.parse(bytes(corrupt))
    with pytest.raises(MalformedPacket):
        parse(packet, False)
    # trusted, the corrupt bytes parse to what they would with a right checksum
    repaired = bytearray(corrupt)
    packet_cases.fix_checksums(repaired)
    assert parse(packet, True) == parse(IpPacket.parse(bytes(repaired)), False)


def test_corrupt_ipv4_header_checksum_is_rejected() -> None:
    corrupt = bytearray(GOLDEN_SYN4)
    corrupt[8] -= 1  # TTL
    with pytest.raises(MalformedPacket, match="bad_ip_checksum"):
        IpPacket.parse(bytes(corrupt))


def test_udp_over_ipv4_zero_checksum_means_none() -> None:
    data = bytearray(GOLDEN_UDP4)
    data[26:28] = b"\0\0"
    data[-1] ^= 0xFF  # not covered by any checksum now
    assert UdpDatagram.parse(IpPacket.parse(bytes(data))).payload == b"hell\x90"


@pytest.mark.parametrize("trusted", [False, True])
def test_udp_over_ipv6_zero_checksum_is_rejected(trusted: bool) -> None:
    data = bytearray(GOLDEN_UDP6)
    data[46:48] = b"\0\0"
    with pytest.raises(MalformedPacket, match="udp_zero_checksum_v6"):
        UdpDatagram.parse(IpPacket.parse(bytes(data)), trusted)


def test_udp_length_beyond_the_ip_payload_is_rejected() -> None:
    packet = IpPacket.parse(GOLDEN_UDP4)
    packet.payload = memoryview(bytes(packet.payload[:4]) + b"\x00\x0e" + bytes(packet.payload[6:]))
    with pytest.raises(MalformedPacket, match="bad_udp_length"):
        UdpDatagram.parse(packet, checksum_trusted=True)


def test_udp_length_shorter_than_the_ip_payload_trims_padding() -> None:
    datagram = UdpDatagram(1, 2, b"data")
    l4 = l4_of(datagram.build(4, SRC4, DST4)) + b"\0\0\0"
    packet = IpPacket(4, SRC4, DST4, PROTO_UDP, 64, memoryview(l4))
    assert UdpDatagram.parse(packet) == datagram


# --- IP header variants ----------------------------------------------------------------


def with_ipv6_extensions(packet: bytes, headers: list[tuple[int, bytes]]) -> bytes:
    """Insert extension headers (type, body after the two-byte prefix) after the fixed header."""
    chain = b""
    types = [kind for kind, _ in headers] + [packet[6]]
    for (_, body), next_header in zip(headers, types[1:], strict=False):
        assert (2 + len(body)) % 8 == 0
        chain += bytes([next_header, (2 + len(body)) // 8 - 1]) + body
    payload_len = struct.unpack_from("!H", packet, 4)[0] + len(chain)
    header = packet[:4] + struct.pack("!HB", payload_len, types[0]) + packet[7:40]
    return header + chain + packet[40:]


PAD6 = bytes([1, 4, 0, 0, 0, 0])  # a PadN option filling an 8-byte options header
HOP_BY_HOP, ROUTING, FRAGMENT, DEST_OPTIONS = 0, 43, 44, 60


def test_ipv6_extension_headers_are_skipped_to_the_upper_layer() -> None:
    long_dest_options = bytes([1, 12]) + bytes(12)  # 16 bytes: hdr ext len 1
    routing = bytes([0, 0]) + bytes(4)  # type 0, segments left 0
    data = with_ipv6_extensions(
        GOLDEN_SYN6,
        [(HOP_BY_HOP, PAD6), (DEST_OPTIONS, long_dest_options), (ROUTING, routing)],
    )
    packet = IpPacket.parse(data)
    assert (packet.protocol, packet.fragment) == (PROTO_TCP, False)
    assert TcpSegment.parse(packet) == GOLDEN_SYN6_SEGMENT
    assert IPv6(data)[TCP].seq == GOLDEN_SYN6_SEGMENT.seq  # scapy agrees on the layout


@pytest.mark.parametrize(("offset", "more"), [(0, 1), (185, 0)], ids=["first", "last"])
def test_ipv6_fragment_header_marks_fragment(offset: int, more: int) -> None:
    fragment = struct.pack("!BBHI", PROTO_UDP, 0, (offset << 3) | more, 0xCAFE)
    data = GOLDEN_UDP6[:6] + bytes([FRAGMENT]) + GOLDEN_UDP6[7:40] + fragment + GOLDEN_UDP6[40:]
    data = data[:4] + struct.pack("!H", len(data) - 40) + data[6:]
    assert IPv6(data)[IPv6ExtHdrFragment].offset == offset
    packet = IpPacket.parse(data)
    assert (packet.protocol, packet.fragment) == (PROTO_UDP, True)


def test_ipv6_extension_header_running_past_the_payload_is_rejected() -> None:
    data = bytearray(with_ipv6_extensions(GOLDEN_SYN6, [(HOP_BY_HOP, PAD6)]))
    data[41] = 200  # hdr ext len far beyond the packet
    with pytest.raises(MalformedPacket, match="bad_ipv6_extension"):
        IpPacket.parse(bytes(data))


def test_ipv4_with_options_is_parsed() -> None:
    router_alert = bytes([0x94, 4, 0, 0])  # RFC 2113, makes IHL 6
    data = bytearray(GOLDEN_SYN4[:20] + router_alert + GOLDEN_SYN4[20:])
    data[0] = 0x46
    data[2:4] = struct.pack("!H", len(data))
    data = bytearray(with_ipv4_header_checksum(data))
    packet = IpPacket.parse(bytes(data))
    assert (packet.src, packet.dst, packet.protocol) == (SRC4, DST4, PROTO_TCP)
    assert TcpSegment.parse(packet) == GOLDEN_SYN4_SEGMENT
    assert IP(bytes(data)).options[0].option == 20  # scapy sees the same router alert


@pytest.mark.parametrize(("name", "golden", "parse"), GOLDEN_PACKETS[::2], ids=GOLDEN_IDS[::2])
def test_ipv4_total_length_shorter_than_the_buffer_trims_padding(
    name: str, golden: bytes, parse: Callable[[IpPacket, bool], object]
) -> None:
    packet = IpPacket.parse(golden + bytes(6))  # e.g. Ethernet minimum-frame padding
    assert bytes(packet.payload) == l4_of(golden)
    assert parse(packet, False) == parse(IpPacket.parse(golden), False)


def test_ipv4_fragments_are_marked() -> None:
    for flags_offset in (0x2000, 0x0001, 0x2010):  # MF; offset 8; both
        data = bytearray(GOLDEN_UDP4)
        data[6:8] = struct.pack("!H", flags_offset)
        assert IpPacket.parse(with_ipv4_header_checksum(data)).fragment
    assert not IpPacket.parse(GOLDEN_UDP4).fragment  # DF alone is not a fragment


# --- ICMP helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("golden", "reply_type"), [(GOLDEN_ECHO4, ICMPV4_ECHO_REPLY), (GOLDEN_ECHO6, ICMPV6_ECHO_REPLY)]
)
def test_echo_reply_swaps_addresses_and_keeps_id_sequence_and_data(
    golden: bytes, reply_type: int
) -> None:
    request = IpPacket.parse(golden)
    reply = IpPacket.parse(echo_reply_for(request, IcmpMessage.parse(request)))
    assert (reply.src, reply.dst, reply.version) == (request.dst, request.src, request.version)
    assert IcmpMessage.parse(reply) == IcmpMessage(
        reply_type, 0, bytes.fromhex("12340001"), b"ping"
    )


def test_echo_reply_for_a_non_request_is_misuse() -> None:
    packet = IpPacket.parse(GOLDEN_ECHO6)
    with pytest.raises(ValueError, match="not an echo request"):
        echo_reply_for(packet, IcmpMessage(ICMPV6_ECHO_REPLY, 0))


@pytest.mark.parametrize(
    ("version", "code", "unreach_type", "limit"),
    [
        (4, ICMPV4_PORT_UNREACHABLE, ICMPV4_DEST_UNREACHABLE, 576),
        (6, ICMPV6_PORT_UNREACHABLE, ICMPV6_DEST_UNREACHABLE, 1280),
    ],
)
@pytest.mark.parametrize("size", [0, 100, 3000])
def test_destination_unreachable_quotes_as_much_as_fits(
    version: int, code: int, unreach_type: int, limit: int, size: int
) -> None:
    src, dst = ADDRS[version]
    original = UdpDatagram(5000, 53, bytes(range(256)) * (size // 256) + bytes(size % 256))
    original_bytes = original.build(version, src, dst)
    error = destination_unreachable(original_bytes, code)
    header_len = (20 if version == 4 else 40) + 8
    assert len(error) == min(limit, header_len + len(original_bytes))
    packet = IpPacket.parse(error)
    assert (packet.src, packet.dst) == (dst, src)  # from the unreachable host back to the source
    message = IcmpMessage.parse(packet)
    assert (message.type, message.code, message.rest_of_header) == (unreach_type, code, bytes(4))
    assert bytes(message.payload) == original_bytes[: limit - header_len]
    quoted = scapy_parse(error)
    inner = quoted[IPerror] if version == 4 else quoted[ICMPv6DestUnreach].payload
    assert (inner.sport, inner.dport) == (5000, 53)


def test_destination_unreachable_fragmentation_needed_carries_the_mtu() -> None:
    original = GOLDEN_SYN4
    error = destination_unreachable(original, ICMPV4_FRAGMENTATION_NEEDED, src=SRC4, mtu=1400)
    packet = IpPacket.parse(error)
    assert (packet.src, packet.dst) == (SRC4, SRC4)
    message = IcmpMessage.parse(packet)
    assert message.rest_of_header == struct.pack("!HH", 0, 1400)
    assert scapy_parse(error)[ICMP].nexthopmtu == 1400


def test_destination_unreachable_of_garbage_is_malformed() -> None:
    for original in (b"", b"\x45" + bytes(10), b"\x60" + bytes(30), b"\x10" * 40):
        with pytest.raises(MalformedPacket):
            destination_unreachable(original, 0)
