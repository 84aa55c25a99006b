"""SOCKS5 messages (RFC 1928 / RFC 1929) byte for byte, and the error types of the client."""

from __future__ import annotations

import ast
import pickle
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tun2socks.outbound.socks5_wire as wire
from tun2socks.config import load_settings
from tun2socks.outbound.socks5 import (
    ProxyEndpoint,
    Socks5AuthFailed,
    Socks5Error,
    Socks5ProtocolError,
    Socks5ProxyUnreachable,
    Socks5ReplyError,
    Socks5Timeout,
)
from tun2socks.outbound.socks5_wire import (
    AuthMethod,
    Command,
    Reply,
    ReplyCode,
    Socks5WireError,
    build_auth,
    build_connect,
    build_greeting,
    build_reply,
    build_request,
    build_udp_associate,
    describe_reply,
    parse_address,
    parse_auth_reply,
    parse_method_selection,
    parse_reply,
    reply_bytes_missing,
)

SECRET = "s3cr3t-Pa55"

# --- golden bytes: client messages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("methods", "expected"),
    [
        ([AuthMethod.NO_AUTHENTICATION], "05 01 00"),
        ([AuthMethod.USERNAME_PASSWORD], "05 01 02"),
        ([0x00, 0x02], "05 02 00 02"),
    ],
)
def test_greeting_lists_methods(methods: list[int], expected: str) -> None:
    assert build_greeting(methods) == bytes.fromhex(expected)


@pytest.mark.parametrize("methods", [[], list(range(256)), [256], [-1]])
def test_greeting_rejects_bad_method_lists(methods: list[int]) -> None:
    with pytest.raises(ValueError):
        build_greeting(methods)


def test_auth_request_is_version_1_with_length_prefixed_fields() -> None:
    assert build_auth("user", "pass") == bytes.fromhex("01 04") + b"user" + b"\x04" + b"pass"


def test_auth_request_sends_utf8() -> None:
    assert build_auth("é", "p") == b"\x01\x02\xc3\xa9\x01p"


def test_auth_request_allows_255_byte_fields() -> None:
    message = build_auth("u" * 255, "p" * 255)
    assert len(message) == 1 + 1 + 255 + 1 + 255


@pytest.mark.parametrize(
    ("username", "password"),
    [("", SECRET), ("u" * 256, SECRET), ("user", ""), ("user", SECRET * 50)],
)
def test_auth_request_rejects_field_lengths_without_echoing_the_password(
    username: str, password: str
) -> None:
    with pytest.raises(ValueError) as info:
        build_auth(username, password)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        (IPv4Address("10.0.0.1"), 80, "05 01 00 01 0a 00 00 01 00 50"),
        ("10.0.0.1", 80, "05 01 00 01 0a 00 00 01 00 50"),
        (IPv6Address("::1"), 443, "05 01 00 04" + " 00" * 15 + " 01 01 bb"),
        ("2001:db8::5", 65535, "05 01 00 04 20 01 0d b8" + " 00" * 11 + " 05 ff ff"),
        ("example.com", 443, "05 01 00 03 0b" + b"example.com".hex() + "01 bb"),
        ("bücher.example", 80, "05 01 00 03 15" + b"xn--bcher-kva.example".hex() + "00 50"),
    ],
)
def test_connect_request_for_each_address_type(
    host: str | IPv4Address | IPv6Address, port: int, expected: str
) -> None:
    assert build_connect(host, port) == bytes.fromhex(expected)


def test_udp_associate_has_command_3_and_the_same_shape() -> None:
    assert build_udp_associate("0.0.0.0", 0) == bytes.fromhex("05 03 00 01 00 00 00 00 00 00")
    connect = build_request(Command.CONNECT, "example.com", 53)
    associate = build_request(Command.UDP_ASSOCIATE, "example.com", 53)
    assert associate == connect[:1] + b"\x03" + connect[2:]


def test_domain_of_255_bytes_is_accepted() -> None:
    name = ".".join(["a" * 63] * 4)[:255]
    assert build_connect(name, 1)[4] == 255


@pytest.mark.parametrize(
    ("host", "port"),
    [("a" * 256, 80), ("", 80), ("example.com", -1), ("example.com", 65536), ("ü" * 64, 80)],
)
def test_request_rejects_unusable_destinations(host: str, port: int) -> None:
    with pytest.raises(ValueError):
        build_connect(host, port)


# --- golden bytes: server messages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "method"),
    [
        ("05 00", AuthMethod.NO_AUTHENTICATION),
        ("05 02", AuthMethod.USERNAME_PASSWORD),
        ("05 ff", AuthMethod.NO_ACCEPTABLE_METHODS),
        ("05 80", 0x80),
    ],
)
def test_method_selection(data: str, method: int) -> None:
    assert parse_method_selection(bytes.fromhex(data)) == method


def test_method_selection_with_wrong_version_is_a_wire_error() -> None:
    with pytest.raises(Socks5WireError):
        parse_method_selection(b"\x04\x00")


def test_method_selection_of_wrong_size_is_our_misuse() -> None:
    with pytest.raises(ValueError):
        parse_method_selection(b"\x05")


@pytest.mark.parametrize(("data", "status"), [("01 00", 0), ("01 01", 1), ("01 ff", 255)])
def test_auth_reply_status(data: str, status: int) -> None:
    assert parse_auth_reply(bytes.fromhex(data)) == status


def test_auth_reply_with_wrong_version_is_a_wire_error() -> None:
    with pytest.raises(Socks5WireError):
        parse_auth_reply(b"\x05\x00")


GOLDEN_REPLIES = [
    ("05 00 00 01 7f 00 00 01 04 38", Reply(ReplyCode.SUCCEEDED, "127.0.0.1", 1080, 10)),
    (
        "05 00 00 04 fe 80" + " 00" * 13 + " 01 00 50",
        Reply(ReplyCode.SUCCEEDED, "fe80::1", 80, 22),
    ),
    ("05 00 00 03 03" + b"a.b".hex() + "1f 90", Reply(ReplyCode.SUCCEEDED, "a.b", 8080, 10)),
    ("05 05 00 01 00 00 00 00 00 00", Reply(ReplyCode.CONNECTION_REFUSED, "0.0.0.0", 0, 10)),
    ("05 09 00 01 00 00 00 00 00 00", Reply(9, "0.0.0.0", 0, 10)),
]


@pytest.mark.parametrize(("data", "expected"), GOLDEN_REPLIES)
def test_reply_parses_each_address_type(data: str, expected: Reply) -> None:
    assert parse_reply(bytes.fromhex(data)) == expected


@pytest.mark.parametrize(("data", "expected"), GOLDEN_REPLIES)
def test_reply_fed_byte_by_byte_is_none_until_its_last_byte(data: str, expected: Reply) -> None:
    raw = bytes.fromhex(data)
    for end in range(len(raw)):
        assert parse_reply(raw[:end]) is None
        missing = reply_bytes_missing(raw[:end])
        # Reading `missing` bytes must make progress and never read past the reply.
        assert 0 < missing <= len(raw) - end
    assert reply_bytes_missing(raw) == 0
    assert parse_reply(raw) == expected


@pytest.mark.parametrize(("data", "expected"), GOLDEN_REPLIES)
def test_reply_ignores_bytes_after_it(data: str, expected: Reply) -> None:
    raw = bytes.fromhex(data)
    assert parse_reply(bytearray(raw + b"GET / HTTP/1.1\r\n")) == expected
    assert parse_reply(memoryview(raw + b"\x05\x00")) == expected


def test_reply_codes_carry_their_rfc_1928_meanings() -> None:
    meanings = [
        "succeeded",
        "general SOCKS server failure",
        "connection not allowed by ruleset",
        "network unreachable",
        "host unreachable",
        "connection refused",
        "TTL expired",
        "command not supported",
        "address type not supported",
    ]
    assert [describe_reply(code) for code in range(9)] == meanings
    assert [ReplyCode(code).description for code in range(9)] == meanings
    assert "0x09" in describe_reply(9)


@pytest.mark.parametrize("data", ["05 05 00 00", "05 05 00 00 00 00 00 00 00 00", "05 05 00 07 ff"])
def test_rfc1928_s6_failure_reply_with_atyp_0_still_reports_its_rep_code(data: str) -> None:
    raw = bytes.fromhex(data)
    assert reply_bytes_missing(raw[:3]) > 0
    assert reply_bytes_missing(raw) == 0  # nothing more is read: the server closes
    assert parse_reply(raw) == Reply(ReplyCode.CONNECTION_REFUSED, "", 0, 4)


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        ("04", "version"),
        ("00 00 00 01 00 00 00 00 00 00", "version"),
        ("05 00 00 02", "address type"),
        ("05 00 00 00 00 00 00 00 00 00", "address type"),
        ("05 00 00 05 00 00 00 00 00 00", "address type"),
        ("05 00 00 03 00 00 00", "empty domain"),
        ("05 00 00 03 02 c3 a9 00 50", "ASCII"),
    ],
)
def test_malformed_reply_is_a_wire_error(data: str, detail: str) -> None:
    with pytest.raises(Socks5WireError, match=detail):
        parse_reply(bytes.fromhex(data))


@given(st.binary(max_size=40))
def test_any_bytes_parse_or_raise_the_wire_error_only(data: bytes) -> None:
    try:
        reply = parse_reply(data)
    except Socks5WireError:
        return
    if reply is not None:
        assert reply.bytes_consumed <= len(data)
        assert reply_bytes_missing(data) == 0


# --- round trips -------------------------------------------------------------------------------

ipv4s = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
ipv6s = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63)
domains = (
    st.lists(labels, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda name: not _is_ip_literal(name))
)
ports = st.integers(0, 65535)


def _is_ip_literal(name: str) -> bool:
    try:
        IPv4Address(name)
    except ValueError:
        return False
    return True


@given(st.integers(0, 255), st.one_of(ipv4s, ipv6s), ports)
def test_reply_round_trips_ip_addresses(
    code: int, host: IPv4Address | IPv6Address, port: int
) -> None:
    raw = build_reply(code, host, port)
    assert parse_reply(raw) == (code, str(host), port, len(raw))


@given(st.integers(0, 255), domains, ports)
def test_reply_round_trips_domain_names(code: int, host: str, port: int) -> None:
    raw = build_reply(code, host, port)
    assert parse_reply(raw) == (code, host, port, len(raw))


@given(st.one_of(ipv4s.map(str), ipv6s.map(str), domains), ports)
def test_request_address_round_trips(host: str, port: int) -> None:
    raw = build_connect(host, port)
    parsed = parse_address(raw, 3)
    assert parsed is not None
    assert (parsed[0], parsed[1], parsed[2]) == (
        str(IPv6Address(host)) if ":" in host else host,
        port,
        len(raw),
    )


# --- the pure-module boundary ------------------------------------------------------------------


def test_wire_module_imports_no_io() -> None:
    tree = ast.parse(Path(wire.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "os", "time", "selectors", "logging"}


# --- errors and the endpoint never show the password -------------------------------------------


def test_reply_error_text_is_one_line_naming_proxy_request_and_reply() -> None:
    error = Socks5ReplyError("connection refused", "127.0.0.1:1080", "10.0.0.1:80", "CONNECT", 5)
    assert str(error) == (
        "SOCKS5 proxy 127.0.0.1:1080: CONNECT 10.0.0.1:80 failed: connection refused (reply 5)"
    )
    assert (error.reply_code, error.reason) == (5, "connection refused")


@pytest.mark.parametrize(
    "cls", [Socks5ProxyUnreachable, Socks5AuthFailed, Socks5ProtocolError, Socks5Timeout]
)
def test_non_reply_errors_have_no_reply_code(cls: type[Socks5Error]) -> None:
    error = cls("some reason", "[::1]:1080", "example.com:443")
    assert error.reply_code is None
    assert isinstance(error, Socks5Error)
    assert "\n" not in str(error)
    assert str(error).endswith("failed: some reason")


def test_error_kinds_are_distinct() -> None:
    classes = [Socks5ProxyUnreachable, Socks5AuthFailed, Socks5ProtocolError, Socks5Timeout]
    kinds = {cls("r", "p", "t").kind for cls in classes}
    kinds |= {Socks5ReplyError("r", "p", "t", "CONNECT", code).kind for code in range(1, 256)}
    assert len(kinds) == len(classes) + 255


def test_error_survives_pickling() -> None:
    error = Socks5ReplyError("host unreachable", "127.0.0.1:1080", "10.0.0.1:80", "CONNECT", 4)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is Socks5ReplyError
    assert (str(copy), copy.reply_code) == (str(error), 4)


def test_endpoint_repr_hides_the_password() -> None:
    proxy = ProxyEndpoint("127.0.0.1", 1080, "alice", SECRET)
    assert SECRET not in repr(proxy)
    assert SECRET not in str(proxy)
    assert "alice" in repr(proxy)
    assert proxy.address == "127.0.0.1:1080"


def test_endpoint_brackets_ipv6_in_its_address() -> None:
    assert ProxyEndpoint("::1", 1080).address == "[::1]:1080"


@pytest.mark.parametrize(
    ("username", "password"), [("alice", None), (None, SECRET), ("alice", SECRET * 30)]
)
def test_endpoint_rejects_unusable_credentials_without_echoing_them(
    username: str | None, password: str | None
) -> None:
    with pytest.raises(ValueError) as info:
        ProxyEndpoint("127.0.0.1", 1080, username, password)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("port", [0, 65536])
def test_endpoint_rejects_bad_ports(port: int) -> None:
    with pytest.raises(ValueError):
        ProxyEndpoint("127.0.0.1", port)


def test_endpoint_from_config_unwraps_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2S_TEST_PROXY_PASSWORD", SECRET)
    url = "socks5://alice:${T2S_TEST_PROXY_PASSWORD}@proxy.example:1080"
    settings = load_settings(None, cli={"proxy.url": url})
    proxy = ProxyEndpoint.from_config(settings.proxy)
    assert proxy == ProxyEndpoint("proxy.example", 1080, "alice", SECRET)
    assert SECRET not in repr(proxy)


def test_endpoint_from_config_without_credentials() -> None:
    settings = load_settings(None, cli={"proxy.url": "socks5://127.0.0.1:1080"})
    proxy = ProxyEndpoint.from_config(settings.proxy)
    assert proxy == ProxyEndpoint("127.0.0.1", 1080)
