"""The HTTP CONNECT codec (tun2socks/outbound/http_connect_wire.py), bytes only."""

from __future__ import annotations

import base64
from ipaddress import IPv4Address, IPv6Address

import pytest

from tun2socks.outbound.http_connect_wire import (
    MAX_HEAD,
    HttpWireError,
    authority,
    basic_credentials,
    build_connect,
    parse_response_head,
)


def test_rfc9110_9_3_6_connect_uses_authority_form_and_same_host_field() -> None:
    assert build_connect("example.com", 443) == (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )


def test_rfc9110_9_3_6_ipv6_target_in_brackets() -> None:
    assert authority(IPv6Address("fd00::2"), 80) == "[fd00::2]:80"
    assert authority("fd00:0::2", 80) == "[fd00::2]:80"
    assert authority(IPv4Address("10.0.0.1"), 8080) == "10.0.0.1:8080"


@pytest.mark.parametrize(("host", "port"), [("bad host", 80), ("a\r\nX: y", 80), ("h", 0)])
def test_unusable_target_is_refused_before_sending(host: str, port: int) -> None:
    with pytest.raises(HttpWireError):
        build_connect(host, port)


def test_rfc7617_2_basic_credentials_are_base64_of_user_colon_password_in_utf8() -> None:
    request = build_connect("h", 1, ("Aladdin", "open sesame"))
    assert b"Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n" in request
    value = basic_credentials("jürgen", "pä:ss")
    assert base64.b64decode(value.removeprefix("Basic ")) == "jürgen:pä:ss".encode()


def test_rfc7617_2_user_id_with_colon_is_refused() -> None:
    with pytest.raises(HttpWireError, match="cannot contain ':'"):
        basic_credentials("a:b", "c")


def test_control_characters_in_credentials_cannot_inject_fields() -> None:
    with pytest.raises(HttpWireError):
        basic_credentials("a", "b\r\nX-Evil: 1")


def test_response_head_incomplete_until_blank_line() -> None:
    assert parse_response_head(b"HTTP/1.1 200 Connection established\r\n") is None
    head = parse_response_head(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\nDATA")
    assert head is not None
    assert (head.status, head.reason, head.is_success) == (200, "Connection established", True)
    assert head.length == len(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n")


def test_rfc9110_9_3_6_any_2xx_is_a_tunnel_anything_else_is_not() -> None:
    for status, success in [(200, True), (204, True), (407, False), (403, False), (502, False)]:
        head = parse_response_head(f"HTTP/1.0 {status} X\r\n\r\n".encode())
        assert head is not None and head.is_success is success


def test_status_line_without_reason_phrase() -> None:
    head = parse_response_head(b"HTTP/1.1 403\r\n\r\n")
    assert head is not None and head.status_line == "403"


@pytest.mark.parametrize(
    "data",
    [
        b"\x05\x00\x00\x01xxxxxx",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 20\r\n\r\n",
    ],
)
def test_non_http_answer_is_a_wire_error(data: bytes) -> None:
    with pytest.raises(HttpWireError):
        parse_response_head(data)


def test_endless_head_is_a_wire_error() -> None:
    with pytest.raises(HttpWireError, match="longer than"):
        parse_response_head(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HEAD // 6 + 1))
