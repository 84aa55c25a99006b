"""Smaller rules of IPv6 parsing (RFC 8200, RFC 5095, RFC 7112) and TCP (RFC 1122 4.2.3.10,
RFC 9293 3.8.6.2.1, RFC 6191)."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest
from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrRouting
from scapy.packet import raw

from tests.support.tcp_helpers import (
    CLIENT_PORT,
    SERVER_PORT,
    Client,
    established,
    make_stack,
    time_wait,
    wrap,
)
from tun2socks.net.events import FlowRequested
from tun2socks.net.ip import IpPacket, MalformedPacket
from tun2socks.net.tcp import ACK, FIN, SYN, TcpOptions, TcpSegment

CLIENT6, SERVER6 = "fd00:7f::2", "2001:db8::80"

# ---------------------------------------------------------------- IPv6 headers


def test_ipv6_parsing_stops_at_the_fragment_header() -> None:
    # RFC 8200 4.5: after the fragment header comes the fragmentable part; in a non-first
    # fragment that is plain data, even if it looks like a Destination Options header.
    data = b"\x06\xff" + bytes(14)  # "next header TCP, length 2048 bytes"
    fragment = IPv6(src=CLIENT6, dst=SERVER6) / IPv6ExtHdrFragment(nh=60, offset=2, m=1, id=9)
    packet = IpPacket.parse(raw(fragment / data))
    assert packet.fragment
    assert packet.protocol == 60
    assert bytes(packet.payload) == data


def test_ipv6_type0_routing_header_with_segments_left_is_discarded() -> None:
    # RFC 5095 3: RH0 is not processed; with segments left the packet is not for us.
    syn = (
        IPv6(src=CLIENT6, dst=SERVER6)
        / IPv6ExtHdrRouting(type=0, segleft=1, addresses=["2001:db8::81"])
        / TCP(sport=CLIENT_PORT, dport=SERVER_PORT, flags="S", seq=1)
    )
    with pytest.raises(MalformedPacket, match="ipv6_routing_header"):
        IpPacket.parse(raw(syn))
    stack = make_stack()
    stack.receive_packet(raw(syn), 0.0)
    assert stack.next_event() is None
    assert stack.drops["ipv6_routing_header"] == 1


def test_ipv6_routing_header_with_no_segments_left_is_skipped() -> None:
    # RFC 8200 4.4: an unrecognised routing type with Segments Left 0 is ignored.
    packet = (
        IPv6(src=CLIENT6, dst=SERVER6)
        / IPv6ExtHdrRouting(type=0, segleft=0, addresses=["2001:db8::81"])
        / TCP(sport=CLIENT_PORT, dport=SERVER_PORT, flags="S")
    )
    assert IpPacket.parse(raw(packet)).protocol == 6


def _syn6_fragments(first_len: int) -> list[bytes]:
    """A TCP SYN over IPv6 cut into two fragments, the first carrying `first_len` bytes of
    the TCP header."""
    syn = raw(
        IPv6(src=CLIENT6, dst=SERVER6)
        / TCP(
            sport=CLIENT_PORT,
            dport=SERVER_PORT,
            flags="S",
            seq=1,
            options=[("MSS", 1440), ("NOP", None), ("WScale", 7)],
        )
    )
    tcp = syn[40:]
    header = bytearray(syn[:40])
    pieces = []
    for start, chunk, more in ((0, tcp[:first_len], 1), (first_len, tcp[first_len:], 0)):
        struct.pack_into("!HB", header, 4, 8 + len(chunk), 44)
        frag = struct.pack("!BBHI", 6, 0, start | more, 77)
        pieces.append(bytes(header) + frag + chunk)
    return pieces


def test_ipv6_tiny_first_fragment_without_the_whole_tcp_header_is_discarded() -> None:
    # RFC 7112 5: the first fragment must hold the whole header chain, TCP header included.
    stack = make_stack()
    for piece in _syn6_fragments(8):
        stack.receive_packet(piece, 0.0)
    assert stack.next_event() is None
    assert stack.drops["tiny_first_fragment"] == 1


def test_ipv6_first_fragment_with_the_whole_tcp_header_is_reassembled() -> None:
    stack = make_stack()
    for piece in _syn6_fragments(24):
        stack.receive_packet(piece, 0.0)
    assert isinstance(stack.next_event(), FlowRequested)


# ---------------------------------------------------------------- SYNs that open nothing


def _syn_to(version: int, src: str, dst: str, flags: int = SYN) -> bytes:
    segment = TcpSegment(CLIENT_PORT, SERVER_PORT, 1000, 0, flags, 65535, b"", TcpOptions(mss=1460))
    return segment.build(version, ip_address(src).packed, ip_address(dst).packed)


@pytest.mark.parametrize(
    ("version", "src", "dst"),
    [
        (4, "198.18.0.2", "224.0.0.251"),
        (4, "198.18.0.2", "255.255.255.255"),
        (4, "224.0.0.5", "192.0.2.80"),
        (6, "fd00:7f::2", "ff02::1"),
    ],
)
def test_syn_to_or_from_multicast_or_broadcast_is_dropped(version: int, src: str, dst: str) -> None:
    # RFC 1122 4.2.3.10: a SYN to a broadcast or multicast address is silently discarded.
    stack = make_stack()
    stack.receive_packet(_syn_to(version, src, dst), 0.0)
    assert stack.next_event() is None
    assert stack.packets_to_send(0.0) == []


def test_syn_with_fin_is_dropped() -> None:
    # No stack sends SYN+FIN; it is a scan or an evasion attempt: no flow, no answer.
    stack = make_stack()
    stack.receive_packet(_syn_to(4, "198.18.0.2", "192.0.2.80", SYN | FIN), 0.0)
    assert stack.next_event() is None
    assert stack.packets_to_send(0.0) == []
    assert stack.drops["syn_fin"] == 1


# ---------------------------------------------------------------- sender silly window


def test_established_sender_sws_avoidance_sends_no_small_segment_while_data_is_in_flight() -> None:
    # RFC 9293 3.8.6.2.1: with data in flight, send only a full segment, all the queued data
    # or half the largest window offered; a 500-byte sliver waits for the next ACK.
    c = established(mss=1000)
    c.send(window=2500)
    c.stack.send(c.flow_id, bytes(10_000))
    first = c.output()
    assert [len(s.payload) for s in first] == [1000, 1000]
    c.absorb(first)
    c.send(window=2500)
    assert [len(s.payload) for s in c.output()] == [1000, 1000]


def test_established_sender_sends_the_last_small_piece_of_queued_data() -> None:
    c = established(mss=1000)
    c.stack.send(c.flow_id, bytes(2500))
    assert [len(s.payload) for s in c.output()] == [1000, 1000, 500]


# ---------------------------------------------------------------- TIME-WAIT


def _new_syn(c: Client, seq: int) -> None:
    c.send(seq=seq, ack=0, flags=SYN, options=TcpOptions(mss=1460))


def test_time_wait_syn_below_rcv_nxt_does_not_reopen() -> None:
    # RFC 6191 (RFC 1122 4.2.2.13): without timestamps, only a SYN above RCV.NXT may
    # replace a flow in TIME-WAIT; an older one is an old duplicate and gets an ACK.
    c = time_wait()
    _new_syn(c, wrap(c.snd_nxt - 1000))
    assert c.events() == []
    (ack,) = c.output()
    assert ack.flags == ACK and ack.ack == c.snd_nxt


def test_time_wait_syn_above_rcv_nxt_reopens() -> None:
    c = time_wait()
    _new_syn(c, wrap(c.snd_nxt + 100_000))
    assert [type(e) for e in c.events()] == [FlowRequested]
