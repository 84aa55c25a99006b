"""Bad bytes from the wire: counted by reason and dropped, never raised (smoltcp's wire tests)."""

from __future__ import annotations

import ipaddress
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tun2socks.net
from tests.support.import_scan import IO_MODULES, imported_modules
from tests.support.tcp_helpers import ADDRESSES, Client, established, make_stack, parse_packet, wrap
from tun2socks.net.checksum import checksum, pseudo_header_sum
from tun2socks.net.events import DatagramReceived, FlowRequested
from tun2socks.net.icmp import IcmpMessage
from tun2socks.net.icmp_responder import IcmpResponder
from tun2socks.net.ip import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IpPacket,
    MalformedPacket,
    build_ip_header,
)
from tun2socks.net.stack import Stack, StackConfig
from tun2socks.net.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions, TcpSegment, build_tcp_packet
from tun2socks.net.udp import UdpDatagram

CLIENT4, SERVER4 = ADDRESSES[4]
CLIENT6, SERVER6 = ADDRESSES[6]
FORBIDDEN_IMPORTS = IO_MODULES


def syn_packet(version: int = 4) -> bytes:
    return (
        Client(version=version)
        .segment(seq=1000, ack=0, flags=SYN, options=TcpOptions(mss=1460))
        .build(version, *ADDRESSES[version])
    )


def with_tcp_checksum(packet: bytes, version: int = 4) -> bytes:
    """`packet` (no IPv6 extension headers) with its TCP checksum recomputed."""
    header = 20 if version == 4 else 40
    tcp = bytearray(packet[header:])
    tcp[16:18] = b"\0\0"
    src, dst = ADDRESSES[version]
    tcp[16:18] = checksum(tcp, pseudo_header_sum(src, dst, PROTO_TCP, len(tcp))).to_bytes(2, "big")
    return packet[:header] + bytes(tcp)


def with_ipv4_checksum(packet: bytes) -> bytes:
    header = bytearray(packet[:20])
    header[10:12] = b"\0\0"
    header[10:12] = checksum(header).to_bytes(2, "big")
    return bytes(header) + packet[20:]


def with_ipv6_extension(packet: bytes, kind: int, body: bytes) -> bytes:
    """Insert one extension header of type `kind` (next header, then `body`) after the IPv6
    header; the TCP checksum stays valid because the pseudo-header length is the TCP length."""
    upper = packet[6]
    ext = bytes((upper,)) + body
    assert len(ext) % 8 == 0
    payload_len = struct.unpack_from("!H", packet, 4)[0] + len(ext)
    header = packet[:4] + struct.pack("!HB", payload_len, kind) + packet[7:40]
    return header + ext + packet[40:]


def drops_after(packet: bytes) -> dict[str, int]:
    stack = make_stack()
    stack.receive_packet(packet, 0.0)
    assert stack.next_event() is None
    assert stack.packets_to_send(0.0) == []
    return dict(stack.drops)


# ---------------------------------------------------------------- IP


def test_empty_packet_is_dropped() -> None:
    assert drops_after(b"") == {"empty": 1}


def test_unknown_ip_version_is_dropped() -> None:
    assert drops_after(b"\x50" + bytes(39)) == {"bad_ip_version": 1}


@pytest.mark.parametrize("version", [4, 6])
def test_truncated_ip_header_is_dropped(version: int) -> None:
    assert drops_after(syn_packet(version)[:19]) == {"truncated_ip": 1}


@pytest.mark.parametrize("version", [4, 6])
def test_ip_length_beyond_packet_is_dropped(version: int) -> None:
    assert drops_after(syn_packet(version)[:-1]) == {"bad_ip_length": 1}


def test_ipv4_header_length_below_minimum_is_dropped() -> None:
    packet = bytearray(syn_packet())
    packet[0] = 0x44
    assert drops_after(with_ipv4_checksum(bytes(packet))) == {"bad_ip_length": 1}


def test_bad_ipv4_header_checksum_is_dropped() -> None:
    packet = bytearray(syn_packet())
    packet[10] ^= 0xFF
    assert drops_after(bytes(packet)) == {"bad_ip_checksum": 1}


def test_ipv4_fragment_is_held_for_reassembly() -> None:
    packet = bytearray(syn_packet())
    packet[6] |= 0x20  # More Fragments: the rest is still to come
    stack = make_stack()
    stack.receive_packet(with_ipv4_checksum(bytes(packet)), 0.0)
    assert stack.next_event() is None and not stack.drops
    assert len(stack.reassembler) == 1


def test_ipv4_dont_fragment_is_not_a_fragment() -> None:
    stack = make_stack()
    stack.receive_packet(syn_packet(), 0.0)  # built with DF set
    assert isinstance(stack.next_event(), FlowRequested)


def test_ipv6_atomic_fragment_is_processed_at_once() -> None:
    # A fragment header with offset 0 and M clear (RFC 6946): the packet is complete.
    packet = with_ipv6_extension(syn_packet(6), 44, bytes(7))
    stack = make_stack()
    stack.receive_packet(packet, 0.0)
    assert isinstance(stack.next_event(), FlowRequested)
    assert not stack.drops


@pytest.mark.parametrize("kind", [0, 43, 60])  # hop-by-hop, routing, destination options
def test_ipv6_extension_headers_are_skipped(kind: int) -> None:
    packet = with_ipv6_extension(syn_packet(6), kind, bytes((1,)) + bytes(14))  # 16 bytes
    stack = make_stack()
    stack.receive_packet(packet, 0.0)
    assert isinstance(stack.next_event(), FlowRequested)
    assert not stack.drops


def test_ipv6_extension_header_beyond_packet_is_dropped() -> None:
    packet = bytearray(with_ipv6_extension(syn_packet(6), 0, bytes(7)))
    packet[41] = 200  # claims 1608 bytes
    assert drops_after(bytes(packet)) == {"bad_ipv6_extension": 1}


def test_ipv6_no_next_header_is_dropped() -> None:
    packet = build_ip_header(6, CLIENT6, SERVER6, 59, 0)
    assert drops_after(packet) == {"no_next_header": 1}


@pytest.mark.parametrize(
    ("version", "icmp_type", "reason"),
    [
        (4, 0, "icmp_ignored"),  # an echo reply: nothing to answer
        (6, 135, "ipv6_control"),  # neighbour solicitation
    ],
)
def test_unanswered_icmp_is_counted_as_drops(version: int, icmp_type: int, reason: str) -> None:
    src, dst = ADDRESSES[version]
    packet = IcmpMessage(icmp_type, 0, bytes(4), b"").build(version, src, dst)
    assert drops_after(packet) == {reason: 1}


@pytest.mark.parametrize("version", [4, 6])
def test_udp_datagram_becomes_an_event(version: int) -> None:
    src, dst = ADDRESSES[version]
    stack = Stack(StackConfig(), random.Random(1))
    stack.receive_packet(UdpDatagram(5353, 53, b"query").build(version, src, dst), 0.0)
    assert stack.next_event() == DatagramReceived(
        ipaddress.ip_address(src), 5353, ipaddress.ip_address(dst), 53, b"query"
    )
    assert not stack.drops


@pytest.mark.parametrize("version", [4, 6])
def test_malformed_udp_is_counted_not_raised(version: int) -> None:
    src, dst = ADDRESSES[version]
    body = bytes(8)  # length field 0: shorter than the header
    packet = build_ip_header(version, src, dst, PROTO_UDP, len(body)) + body
    assert drops_after(packet) == {"bad_udp_length": 1}


@pytest.mark.parametrize("version", [4, 6])
def test_send_datagram_builds_a_valid_udp_packet(version: int) -> None:
    src, dst = ADDRESSES[version]
    stack = Stack(StackConfig(), random.Random(1))
    stack.send_datagram(ipaddress.ip_address(dst), 53, ipaddress.ip_address(src), 5353, b"answer")
    [packet] = stack.packets_to_send(0.0)
    ip = IpPacket.parse(packet)
    assert (ip.src, ip.dst) == (dst, src)
    datagram = UdpDatagram.parse(ip)
    assert (datagram.src_port, datagram.dst_port, bytes(datagram.payload)) == (53, 5353, b"answer")


# ---------------------------------------------------------------- TCP


@pytest.mark.parametrize("version", [4, 6])
def test_truncated_tcp_header_is_dropped(version: int) -> None:
    src, dst = ADDRESSES[version]
    packet = build_ip_header(version, src, dst, PROTO_TCP, 19) + bytes(19)
    assert drops_after(packet) == {"truncated_tcp": 1}


@pytest.mark.parametrize("version", [4, 6])
def test_bad_tcp_checksum_is_dropped(version: int) -> None:
    packet = bytearray(syn_packet(version))
    packet[-1] ^= 0x01
    assert drops_after(bytes(packet)) == {"bad_tcp_checksum": 1}


@pytest.mark.parametrize("offset", [0, 4, 15])  # below the header, beyond the packet
def test_bad_tcp_data_offset_is_dropped(offset: int) -> None:
    packet = bytearray(syn_packet())
    packet[20 + 12] = offset << 4
    assert drops_after(with_tcp_checksum(bytes(packet))) == {"bad_tcp_offset": 1}


@pytest.mark.parametrize(
    "options",
    [
        bytes((2, 0, 0, 0)),  # length 0 would loop forever
        bytes((2, 1, 0, 0)),  # length 1 is shorter than kind + length
        bytes((1, 1, 1, 8)),  # the length byte is missing
        bytes((8, 10, 0, 0)),  # runs past the header
    ],
)
def test_bad_tcp_options_are_dropped(options: bytes) -> None:
    src, dst = ADDRESSES[4]
    packet = build_tcp_packet(
        4,
        src,
        dst,
        pseudo_header_sum(src, dst, PROTO_TCP, 0),
        40000,
        80,
        1000,
        0,
        SYN,
        65535,
        options,
        b"",
        offload=False,
    )
    assert drops_after(packet) == {"bad_tcp_option": 1}


def test_unknown_tcp_options_are_skipped() -> None:
    src, dst = ADDRESSES[4]
    options = bytes((30, 4, 0, 0, 2, 4, 0x05, 0xB4))  # an unknown kind, then MSS 1460
    packet = build_tcp_packet(
        4, src, dst, pseudo_header_sum(src, dst, PROTO_TCP, 0), 40000, 80, 1000, 0, SYN, 65535,
        options, b"", offload=False,
    )  # fmt: skip
    stack = make_stack()
    stack.receive_packet(packet, 0.0)
    assert isinstance(stack.next_event(), FlowRequested)


def test_trusted_checksum_skips_tcp_checksum() -> None:
    packet = bytearray(syn_packet())
    packet[36:38] = b"\0\0"  # as with offload: the kernel checked it
    stack = make_stack()
    stack.receive_packet(bytes(packet), 0.0, checksum_trusted=True)
    assert isinstance(stack.next_event(), FlowRequested)


# ---------------------------------------------------------------- never raises


def _check_output_parses(packets: list[bytes], version: int) -> None:
    for data in packets:
        if IpPacket.parse(data).protocol in (PROTO_ICMP, PROTO_ICMPV6):
            IcmpMessage.parse(IpPacket.parse(data))  # an echo reply or an error, checksum valid
        else:
            parse_packet(data, version)


def _drop_reason(data: bytes) -> str | None:
    """What the stack must count for `data`, from the parsers alone; None if it is TCP, UDP,
    a fragment (the reassembler counts its own drops) or an answered echo request."""
    try:
        packet = IpPacket.parse(data)
        if packet.fragment:
            return None
        if packet.protocol == PROTO_UDP:
            UdpDatagram.parse(packet)
            return None
        if packet.protocol == (PROTO_ICMP if packet.version == 4 else PROTO_ICMPV6):
            IcmpResponder().receive(packet)
            return None
        if packet.protocol != PROTO_TCP:
            return "unsupported_protocol"
        TcpSegment.parse(packet)
    except MalformedPacket as exc:
        return exc.reason
    return None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_and_are_counted(data: bytes) -> None:
    stack = make_stack()
    stack.receive_packet(data, 0.0)
    reason = _drop_reason(data)
    if reason is not None:
        assert stack.drops == {reason: 1}
    assert stack.packets_in == 1


@settings(max_examples=500, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    mutations=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 100)),
)
def test_mutated_packets_never_raise_and_are_counted(
    version: int, mutations: list[tuple[int, int]], cut: int | None
) -> None:
    c = established(Client(version=version))
    valid = c.segment(payload=b"payload", flags=ACK | PSH).build(version, c.addr, c.server_addr)
    packet = bytearray(valid)
    for position, value in mutations:
        packet[position % len(packet)] = value
    data = bytes(packet[:cut] if cut is not None else packet)
    reason = _drop_reason(data)
    before = c.stack.drops[reason] if reason else 0
    c.stack.receive_packet(data, c.now)
    _check_output_parses(c.stack.packets_to_send(c.now), version)
    c.events()
    if reason is not None:
        assert c.stack.drops[reason] == before + 1


segment_fields = st.tuples(
    st.integers(-70_000, 70_000),  # seq, relative to the client's SND.NXT
    st.integers(-70_000, 70_000),  # ack, relative to the client's RCV.NXT
    st.integers(0, 0xFF),  # flags
    st.integers(0, 0xFFFF),  # window
    st.binary(max_size=64),
    st.one_of(st.none(), st.integers(0, 0xFFFF)),  # MSS option
    st.one_of(st.none(), st.integers(0, 255)),  # window scale option
)


@settings(max_examples=300, deadline=None)
@given(
    segments=st.lists(segment_fields, max_size=12),
    actions=st.lists(
        st.sampled_from(["send", "receive", "shutdown", "abort", "wait"]), max_size=12
    ),
)
def test_random_segments_and_calls_never_raise(
    segments: list[tuple[int, int, int, int, bytes, int | None, int | None]], actions: list[str]
) -> None:
    c = established(mss=100)
    shut = False
    actions = actions + ["wait"] * (len(segments) - len(actions))
    for (seq, ack, flags, window, payload, mss, wscale), action in zip(
        segments, actions, strict=False
    ):
        c.send(
            seq=wrap(c.snd_nxt + seq),
            ack=wrap(c.rcv_nxt + ack),
            flags=flags,
            window=window,
            payload=payload,
            options=TcpOptions(mss=mss, wscale=wscale),
        )
        if action == "send" and not shut:
            c.stack.send(c.flow_id, bytes(300))
        elif action == "receive":
            c.stack.receive(c.flow_id)
        elif action == "shutdown":
            c.stack.shutdown(c.flow_id)
            shut = True
        elif action == "abort":
            c.stack.abort(c.flow_id)
        c.now += 0.3
        c.stack.handle_timer(c.now)
        _check_output_parses(c.stack.packets_to_send(c.now), 4)
        c.events()


def test_rst_flags_alone_never_answered_for_unknown_flow() -> None:
    stack = make_stack()
    for flags in (RST, RST | ACK, RST | FIN):
        segment = TcpSegment(40000, 80, 1, 1, flags, 0)
        stack.receive_packet(segment.build(4, CLIENT4, SERVER4), 0.0)
    assert stack.packets_to_send(0.0) == []


# ---------------------------------------------------------------- the sans-IO boundary


def test_pure_modules_import_no_io() -> None:
    package = Path(tun2socks.net.__file__).parent
    paths = sorted(package.glob("*.py"))
    assert len(paths) >= 6
    offenders = {
        path.name: sorted(imported_modules(path) & FORBIDDEN_IMPORTS)
        for path in paths
        if imported_modules(path) & FORBIDDEN_IMPORTS
    }
    assert offenders == {}


def test_import_scanner_sees_forbidden_imports(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("import os.path\nfrom time import monotonic\nif True:\n    import socket\n")
    assert imported_modules(module) & FORBIDDEN_IMPORTS == {"os", "time", "socket"}
