"""Fragment reassembly and fragmentation (RFC 791, RFC 8200 4.5, RFC 5722), sans-IO.

Fragments are cut by scapy, an independent implementation, and what we cut is put back
together by scapy: both directions are checked against someone else's reading of the RFCs.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP, defragment, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, defragment6, fragment6
from scapy.packet import Raw, raw

from tun2socks.net.checksum import checksum
from tun2socks.net.events import DatagramReceived
from tun2socks.net.fragments import FRAGMENT_OVERHEAD, Fragmenter, Reassembler
from tun2socks.net.ip import IpPacket
from tun2socks.net.stack import Stack, StackConfig
from tun2socks.net.udp import UdpDatagram

CLIENT4, SERVER4 = "198.18.0.2", "192.0.2.80"
CLIENT6, SERVER6 = "fd00:7f::2", "2001:db8::80"
PAYLOAD = bytes(range(256)) * 16  # 4 KiB: three fragments at MTU 1500


def udp4(payload: bytes = PAYLOAD, ident: int = 7) -> IP:
    return IP(src=CLIENT4, dst=SERVER4, id=ident) / UDP(sport=40000, dport=7000) / payload


def udp6(payload: bytes = PAYLOAD, ident: int = 7) -> IPv6:
    return (
        IPv6(src=CLIENT6, dst=SERVER6)
        / IPv6ExtHdrFragment(id=ident)
        / UDP(sport=40000, dport=7000)
        / payload
    )


def pieces(version: int, payload: bytes = PAYLOAD, ident: int = 7, size: int = 1480) -> list[bytes]:
    if version == 4:
        return [raw(f) for f in fragment(udp4(payload, ident), size)]
    return [raw(f) for f in fragment6(udp6(payload, ident), size)]


def udp_payload(packet: bytes) -> bytes:
    return bytes(UdpDatagram.parse(IpPacket.parse(packet)).payload)  # checksum verified too


def feed(reassembler: Reassembler, fragments: list[bytes], now: float = 0.0) -> list[bytes]:
    return [whole for f in fragments if (whole := reassembler.add(f, now)) is not None]


def make(memory: int = 1 << 20, timeout: float = 30.0) -> Reassembler:
    return Reassembler(memory, timeout, Counter())


# ---------------------------------------------------------------- reassembly


@pytest.mark.parametrize("version", [4, 6])
def test_in_order_fragments_give_the_whole_datagram(version: int) -> None:
    r = make()
    [whole] = feed(r, pieces(version))
    assert udp_payload(whole) == PAYLOAD
    assert IpPacket.parse(whole).fragment is False
    assert r.memory == 0 and len(r) == 0 and not r.drops


@pytest.mark.parametrize("version", [4, 6])
def test_out_of_order_fragments_are_reassembled(version: int) -> None:
    frags = pieces(version, size=600)  # 8 or more fragments
    random.Random(3).shuffle(frags)
    r = make()
    [whole] = feed(r, frags)
    assert udp_payload(whole) == PAYLOAD


@pytest.mark.parametrize("version", [4, 6])
def test_last_fragment_first_is_reassembled(version: int) -> None:
    r = make()
    [whole] = feed(r, pieces(version)[::-1])
    assert udp_payload(whole) == PAYLOAD


@pytest.mark.parametrize("version", [4, 6])
def test_interleaved_datagrams_are_kept_apart(version: int) -> None:
    a = pieces(version, PAYLOAD, ident=1)
    b = pieces(version, PAYLOAD[::-1], ident=2)
    r = make()
    results = feed(r, [x for pair in zip(a, b, strict=True) for x in pair])
    assert [udp_payload(w) for w in results] == [PAYLOAD, PAYLOAD[::-1]]


@pytest.mark.parametrize("version", [4, 6])
def test_duplicate_fragment_is_dropped_and_the_datagram_kept(version: int) -> None:
    first, *rest = pieces(version)
    r = make()
    assert feed(r, [first, first]) == []
    assert r.drops == {"fragment_duplicate": 1}
    [whole] = feed(r, rest)
    assert udp_payload(whole) == PAYLOAD


def _with_offset(packet: bytes, version: int, offset: int, more: bool) -> bytes:
    """`packet` (one of our test fragments) with its fragment offset field rewritten."""
    data = bytearray(packet)
    if version == 4:
        struct.pack_into("!H", data, 6, (0x2000 if more else 0) | offset // 8)
        struct.pack_into("!H", data, 10, 0)
        struct.pack_into("!H", data, 10, checksum(data[:20]))
    else:
        struct.pack_into("!H", data, 42, offset | (1 if more else 0))
    return bytes(data)


@pytest.mark.parametrize("version", [4, 6])
def test_overlapping_fragments_drop_the_whole_datagram(version: int) -> None:
    """RFC 5722 (IPv6) and Linux (IPv4): an overlap discards the datagram silently."""
    first, second, third = pieces(version)
    # The second fragment moved 8 bytes back: it overlaps the end of the first.
    header = 20 if version == 4 else 48
    start = len(first) - header - 8
    overlapping = _with_offset(second, version, start, more=True)
    r = make()
    assert feed(r, [first, overlapping, third]) == []
    assert r.drops["fragment_overlap"] == 1
    assert r.memory == len(third) - header + FRAGMENT_OVERHEAD  # only the third is held


def test_same_offset_different_bytes_is_an_overlap() -> None:
    first, *rest = pieces(4)
    changed = bytearray(first)
    changed[-1] ^= 0xFF
    r = make()
    assert feed(r, [first, bytes(changed), *rest]) == []
    assert r.drops["fragment_overlap"] == 1


@pytest.mark.parametrize("version", [4, 6])
def test_incomplete_datagram_times_out(version: int) -> None:
    first, _second, third = pieces(version)
    r = make(timeout=30.0)
    feed(r, [first], now=100.0)
    assert r.deadline == 130.0
    r.expire(129.9)
    assert len(r) == 1
    r.expire(130.0)
    assert len(r) == 0 and r.memory == 0 and r.deadline is None
    assert r.drops == {"reassembly_timeout": 1}
    # What arrives afterwards starts over and cannot complete the expired datagram.
    assert feed(r, [third], now=131.0) == []


def test_the_memory_cap_evicts_the_oldest_datagram_first() -> None:
    # Room for one whole datagram (3 fragments: 1480 + 1480 + 1144 data bytes), not two.
    r = make(memory=4400)
    a1, a2, a3 = pieces(4, ident=1)
    b1, b2, b3 = pieces(4, ident=2)
    assert feed(r, [a1, a2]) == []
    assert feed(r, [b1]) == []  # no room for b1 beside datagram 1: the older one goes
    assert r.drops == {"reassembly_memory": 1}
    [whole] = feed(r, [b2, b3])
    assert udp_payload(whole) == PAYLOAD
    assert feed(r, [a3]) == []  # datagram 1 is gone for good
    assert r.memory == len(a3) - 20 + FRAGMENT_OVERHEAD


def test_a_datagram_larger_than_the_cap_is_dropped() -> None:
    r = make(memory=2000)
    assert feed(r, pieces(4)) == []
    assert r.drops["reassembly_memory"] >= 1
    assert r.memory <= 2000


def test_memory_stays_bounded_under_a_flood_of_first_fragments() -> None:
    r = make(memory=64 * 1024)
    first = bytearray(pieces(4)[0])
    for ident in range(2000):
        struct.pack_into("!HH", first, 4, ident, 0x2000)  # identification, More Fragments
        struct.pack_into("!H", first, 10, 0)
        struct.pack_into("!H", first, 10, checksum(first[:20]))
        r.add(bytes(first), 0.0)
        assert r.memory <= 64 * 1024
    assert len(r) <= 64 * 1024 // (1480 + FRAGMENT_OVERHEAD)


def test_fragment_not_a_multiple_of_8_is_dropped() -> None:
    first, *_ = pieces(4)
    data = bytearray(first[:-1])  # 1479 data bytes with MF set
    struct.pack_into("!H", data, 2, len(data))
    struct.pack_into("!H", data, 10, 0)
    struct.pack_into("!H", data, 10, checksum(data[:20]))
    r = make()
    assert r.add(bytes(data), 0.0) is None
    assert r.drops == {"bad_fragment": 1}


def test_fragment_beyond_65535_bytes_is_dropped() -> None:
    last = pieces(4)[-1]
    beyond = _with_offset(last, 4, 65528, more=False)
    r = make()
    assert r.add(beyond, 0.0) is None
    assert r.drops == {"bad_fragment": 1}


def test_ipv6_extension_headers_before_the_fragment_header_are_skipped() -> None:
    packet = (
        IPv6(src=CLIENT6, dst=SERVER6)
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrFragment(id=9)
        / UDP(sport=1, dport=2)
        / PAYLOAD
    )
    r = make()
    [whole] = feed(r, [raw(f) for f in fragment6(packet, 1280)])
    assert udp_payload(whole) == PAYLOAD


# ---------------------------------------------------------------- fragmentation


@pytest.mark.parametrize("mtu", [576, 1280, 1500, 9000])
def test_ipv4_fragments_fit_the_mtu_and_reassemble_in_scapy(mtu: int) -> None:
    packet = UdpDatagram(7000, 40000, PAYLOAD * 4).build(
        4, ipaddress.ip_address(SERVER4).packed, ipaddress.ip_address(CLIENT4).packed
    )
    frags = Fragmenter(mtu, random.Random(41)).split(packet)
    assert len(frags) > 1 and all(len(f) <= mtu for f in frags)
    assert {IP(f).id for f in frags} == {random.Random(41).getrandbits(16)}
    assert all(IP(f).flags.DF == 0 for f in frags)
    [whole] = defragment([IP(f) for f in frags])
    assert bytes(whole[UDP].payload) == PAYLOAD * 4


@pytest.mark.parametrize("mtu", [1280, 1500, 9000])
def test_ipv6_fragments_fit_the_mtu_and_reassemble_in_scapy(mtu: int) -> None:
    packet = UdpDatagram(7000, 40000, PAYLOAD * 4).build(
        6, ipaddress.ip_address(SERVER6).packed, ipaddress.ip_address(CLIENT6).packed
    )
    frags = Fragmenter(mtu, random.Random(7)).split(packet)
    assert len(frags) > 1 and all(len(f) <= mtu for f in frags)
    whole = defragment6([IPv6(f) for f in frags])
    assert bytes(whole[UDP].payload) == PAYLOAD * 4


@pytest.mark.parametrize("version", [4, 6])
def test_our_fragments_reassemble_in_our_reassembler(version: int) -> None:
    src, dst = (SERVER4, CLIENT4) if version == 4 else (SERVER6, CLIENT6)
    packet = UdpDatagram(7000, 40000, PAYLOAD).build(
        version, ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    )
    [whole] = feed(make(), Fragmenter(1280, random.Random(0)).split(packet))
    assert udp_payload(whole) == PAYLOAD


def test_a_packet_that_fits_is_not_cut() -> None:
    packet = raw(IP(src=CLIENT4, dst=SERVER4) / UDP() / Raw(b"x" * 100))
    assert Fragmenter(1500).split(packet) == [packet]


# ---------------------------------------------------------------- in the stack


@pytest.mark.parametrize("version", [4, 6])
def test_stack_turns_fragments_into_one_datagram_event(version: int) -> None:
    stack = Stack(StackConfig(), random.Random(1))
    for f in pieces(version)[::-1]:
        stack.receive_packet(f, 0.0)
    event = stack.next_event()
    assert isinstance(event, DatagramReceived)
    assert (event.src_port, event.dst_port, event.payload) == (40000, 7000, PAYLOAD)
    assert not stack.drops


@pytest.mark.parametrize(("version", "offload"), [(4, False), (4, True), (6, False), (6, True)])
def test_stack_fragments_replies_larger_than_the_mtu(version: int, offload: bool) -> None:
    stack = Stack(StackConfig(mtu=1500, offload=offload), random.Random(1))
    src, dst = (SERVER4, CLIENT4) if version == 4 else (SERVER6, CLIENT6)
    server, client = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    stack.send_datagram(server, 7000, client, 40000, PAYLOAD)
    frags = stack.packets_to_send(0.0)
    assert len(frags) == 3 and all(len(f) <= 1500 for f in frags)
    # Complete checksums even with offload: the kernel finishes only whole packets.
    [whole] = feed(make(), frags)
    assert udp_payload(whole) == PAYLOAD


def test_stack_timer_covers_reassembly_and_expires_it() -> None:
    stack = Stack(StackConfig(reassembly_timeout=5.0), random.Random(1))
    stack.receive_packet(pieces(4)[0], 10.0)
    assert stack.get_timer() == 15.0
    stack.handle_timer(15.0)
    assert stack.drops == {"reassembly_timeout": 1}
    assert stack.get_timer() is None


# ---------------------------------------------------------------- hostile input


fragment_fields = st.tuples(
    st.integers(0, 3),  # identification: a few datagrams interleaved
    st.integers(0, 8191),  # offset in 8-byte units
    st.integers(0, 200),  # length in bytes
    st.booleans(),  # more fragments
    st.integers(0, 255),  # fill byte
)


def _v4_fragment(ident: int, offset: int, length: int, more: bool, fill: int) -> bytes:
    header = bytearray(20)
    header[0], header[8], header[9] = 0x45, 64, 17
    struct.pack_into("!HHH", header, 2, 20 + length, ident, (0x2000 if more else 0) | offset)
    header[12:20] = ipaddress.ip_address(CLIENT4).packed + ipaddress.ip_address(SERVER4).packed
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header) + bytes([fill]) * length


@settings(max_examples=300, deadline=None)
@given(fragments=st.lists(fragment_fields, max_size=40), cap=st.integers(2000, 20000))
def test_random_fragments_never_raise_and_memory_stays_under_the_cap(
    fragments: list[tuple[int, int, int, bool, int]], cap: int
) -> None:
    stack = Stack(StackConfig(reassembly_memory=cap, reassembly_timeout=30.0), random.Random(1))
    for step, fields in enumerate(fragments):
        stack.receive_packet(_v4_fragment(*fields), float(step))
        assert stack.reassembler.memory <= cap
        stack.packets_to_send(float(step))
    while (event := stack.next_event()) is not None:  # whatever completed parsed as UDP
        assert isinstance(event, DatagramReceived)
    stack.handle_timer(1000.0)
    assert stack.reassembler.memory == 0 and len(stack.reassembler) == 0
