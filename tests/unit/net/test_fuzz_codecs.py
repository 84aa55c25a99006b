"""Property-based fuzzing of the IP/TCP/UDP/ICMP codecs with mutated valid packets.

test_codec.py and test_stack_input.py check that garbage raises only MalformedPacket; here
valid packets get a few bytes changed and their checksums fixed, so that mutations reach the
header and option parsers, and whatever still parses must survive build -> parse unchanged.
Coverage-guided, the same runs longer under atheris (tests/fuzz/fuzz_packets.py).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import packet_cases
from tun2socks.net.events import DatagramReceived
from tun2socks.net.ip import IpPacket, MalformedPacket
from tun2socks.net.stack import Stack, StackConfig


@settings(max_examples=1000, deadline=None)
@given(
    template=st.sampled_from(packet_cases.TEMPLATES),
    mutations=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 2000),
    tail=st.binary(max_size=64),
    fix=st.booleans(),
    trusted=st.booleans(),
)
def test_mutated_packets_parse_consistently_and_never_break_the_stack(
    template: bytes,
    mutations: list[tuple[int, int]],
    cut: int,
    tail: bytes,
    fix: bool,
    trusted: bool,
) -> None:
    packet = bytearray(template)
    for position, value in mutations:
        packet[position % len(packet)] = value
    packet = packet[: cut % (len(packet) + 1)] + tail
    if fix:
        packet_cases.fix_checksums(packet)
    packet_cases.check_packet(bytes(packet), trusted)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.sampled_from(packet_cases.FRAGMENT_SETS),
    order=st.lists(st.integers(0, 2), max_size=6),
    mutations=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 600), st.integers(0, 255))),
    trusted=st.booleans(),
)
def test_fragments_in_any_order_mutated_or_missing_never_break_the_stack(
    pieces: list[bytes],
    order: list[int],
    mutations: list[tuple[int, int, int]],
    trusted: bool,
) -> None:
    sent = [bytearray(pieces[i]) for i in order]  # any order, duplicates, some left out
    for which, position, value in mutations:
        if sent:
            piece = sent[which % len(sent)]
            piece[position % len(piece)] = value
    packet_cases.check_fragments([bytes(p) for p in sent], trusted)


def test_templates_are_valid_packets() -> None:
    for template in packet_cases.VALID_TEMPLATES:
        packet_cases.reparse(IpPacket.parse(template), trusted=False)


def test_udp_with_a_bad_length_is_dropped_and_padding_is_trimmed() -> None:
    longer, shorter, padded = packet_cases.BAD_UDP_LENGTHS
    for bad in (longer, shorter):
        stack = Stack(StackConfig())
        stack.receive_packet(bad, 0.0)
        assert stack.drops == {"bad_udp_length": 1} and stack.next_event() is None
    stack = Stack(StackConfig())
    stack.receive_packet(padded, 0.0)
    event = stack.next_event()
    assert isinstance(event, DatagramReceived) and event.payload == b"q" * 24


def test_a_broken_template_is_malformed() -> None:
    broken = bytearray(packet_cases.VALID_TEMPLATES[0])
    broken[-1] ^= 0xFF
    try:
        packet_cases.reparse(IpPacket.parse(bytes(broken)), trusted=False)
    except MalformedPacket as exc:
        assert exc.reason == "bad_tcp_checksum"
    else:
        raise AssertionError("a corrupted TCP checksum was accepted")
