"""Property-based fuzzing of the IP/TCP/UDP/ICMP codecs with mutated valid packets.

test_codec.py and test_stack_input.py check that garbage raises only MalformedPacket; here
valid packets get a few bytes changed and their checksums fixed, so that mutations reach the
header and option parsers, and whatever still parses must survive build -> parse unchanged.
Coverage-guided, the same runs longer under atheris (tests/fuzz/fuzz_packets.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tun2socks.net.ip import IpPacket, MalformedPacket

# The harness's templates and checks are plain functions; its atheris import is only for
# running it, so load them without atheris.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
import packet_cases


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


def test_templates_are_valid_packets() -> None:
    for template in packet_cases.TEMPLATES:
        packet_cases.reparse(IpPacket.parse(template), trusted=False)


def test_a_broken_template_is_malformed() -> None:
    broken = bytearray(packet_cases.TEMPLATES[0])
    broken[-1] ^= 0xFF
    try:
        packet_cases.reparse(IpPacket.parse(bytes(broken)), trusted=False)
    except MalformedPacket as exc:
        assert exc.reason == "bad_tcp_checksum"
    else:
        raise AssertionError("a corrupted TCP checksum was accepted")
