"""The wire codec (tun2socks.net: checksum, ip, tcp, udp, icmp) byte for byte.

Golden bytes were produced once by scapy and checked field by field; the round-trip and
cross-check properties compare us with scapy as an independent implementation.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, IPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    IPv6,
    IPv6ExtHdrFragment,
)

from tests.support import packet_cases
from tests.support.codec_cases import (
    ADDRS,
    DST4,
    DST6,
    GOLDEN_ECHO4,
    GOLDEN_ECHO6,
    GOLDEN_IDS,
    GOLDEN_PACKETS,
    GOLDEN_SYN4,
    GOLDEN_SYN4_SEGMENT,
    GOLDEN_SYN6,
    GOLDEN_SYN6_SEGMENT,
    GOLDEN_UDP4,
    GOLDEN_UDP6,
    SRC4,
    SRC6,
    icmp_messages,
    l4_of,
    naive_checksum,
    naive_ones_sum,
    pseudo_header,
    scapy_parse,
    tcp_options,
    tcp_segments,
    udp_datagrams,
    versions,
    with_ipv4_header_checksum,
)
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
from tun2socks.net.tcp import ACK, PSH, URG, TcpOptions, TcpSegment
from tun2socks.net.udp import UdpDatagram

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
