"""The RFC 1928 section 7 UDP request header, both ways: golden bytes, bad input, round trips."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tun2socks.outbound.socks5_wire import (
    Socks5WireError,
    build_udp_datagram,
    parse_udp_datagram,
)

# RSV RSV FRAG | ATYP | DST.ADDR | DST.PORT | DATA
GOLDEN = [
    ("198.51.100.7", 53, b"\x00\x00\x00\x01\xc6\x33\x64\x07\x00\x35"),
    ("2001:db8::1", 443, b"\x00\x00\x00\x04" + IPv6Address("2001:db8::1").packed + b"\x01\xbb"),
    ("example.com", 5353, b"\x00\x00\x00\x03\x0bexample.com\x14\xe9"),
]


@pytest.mark.parametrize(("host", "port", "header"), GOLDEN)
def test_build_golden_bytes(host: str, port: int, header: bytes) -> None:
    assert build_udp_datagram(host, port, b"data") == header + b"data"


@pytest.mark.parametrize(("host", "port", "header"), GOLDEN)
def test_parse_golden_bytes(host: str, port: int, header: bytes) -> None:
    parsed_host, parsed_port, payload = parse_udp_datagram(header + b"data")
    assert (parsed_host, parsed_port, bytes(payload)) == (host, port, b"data")


def test_address_objects_are_accepted() -> None:
    assert build_udp_datagram(IPv4Address("198.51.100.7"), 53, b"") == GOLDEN[0][2]


def test_empty_payload_round_trips() -> None:
    assert bytes(parse_udp_datagram(build_udp_datagram("10.0.0.1", 9, b""))[2]) == b""


def test_socks_fragment_is_rejected() -> None:
    """Section 7: an implementation that does not reassemble MUST drop FRAG != 0."""
    datagram = bytearray(build_udp_datagram("10.0.0.1", 9, b"x"))
    datagram[2] = 1
    with pytest.raises(Socks5WireError, match="fragment"):
        parse_udp_datagram(bytes(datagram))


@pytest.mark.parametrize("cut", range(10))
def test_truncated_header_is_rejected(cut: int) -> None:
    with pytest.raises(Socks5WireError):
        parse_udp_datagram(GOLDEN[0][2][:cut])


def test_unknown_address_type_is_rejected() -> None:
    with pytest.raises(Socks5WireError):
        parse_udp_datagram(b"\x00\x00\x00\x07" + bytes(10))


def test_bad_port_is_our_bug() -> None:
    with pytest.raises(ValueError):
        build_udp_datagram("10.0.0.1", 70000, b"")


@given(
    host=st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,6}){1,3}", fullmatch=True),
    ),
    port=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=2000),
)
def test_round_trip(host: str, port: int, payload: bytes) -> None:
    parsed_host, parsed_port, parsed_payload = parse_udp_datagram(
        build_udp_datagram(host, port, payload)
    )
    assert (parsed_host, parsed_port, bytes(parsed_payload)) == (host, port, payload)


@given(st.binary(max_size=64))
def test_random_bytes_parse_or_raise_wire_error(data: bytes) -> None:
    with contextlib.suppress(Socks5WireError):
        parse_udp_datagram(data)
