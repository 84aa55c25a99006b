"""SOCKS5 messages (RFC 1928) and username/password authentication (RFC 1929), sans-IO.

Theory of operation: this module only turns values into bytes and bytes into values. It never
touches a socket or a clock, so the asyncio driver (``socks5.py``), a UDP ASSOCIATE client and
the tests can share it. A client conversation is:

    greeting          -> build_greeting(methods)
    method selection  <- parse_method_selection(2 bytes)
    (method 0x02)     -> build_auth(username, password)
                      <- parse_auth_reply(2 bytes)
    request           -> build_request(Command.CONNECT, host, port)
    reply             <- parse_reply(buffer): None until complete, then the fields and its size

Replies have a variable length (the bound address), so ``reply_bytes_missing`` tells a driver how
many more bytes to read without ever reading past the reply: bytes after it belong to the
relayed stream.

Bad bytes from the server raise ``Socks5WireError``; misuse of these functions by our own code
(a port out of range, a 300-byte password) raises ``ValueError``. Messages never contain the
password, since callers may log them.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import NamedTuple

SOCKS_VERSION = 5  # RFC 1928 section 3
AUTH_VERSION = 1  # RFC 1929 section 2: version of the username/password sub-negotiation

METHOD_SELECTION_SIZE = 2  # VER METHOD
AUTH_REPLY_SIZE = 2  # VER STATUS
# The shortest reply (a one-byte domain) is 4 + 1 + 1 + 2 = 8 bytes, so reading 5 bytes is always
# safe, and 5 bytes are enough to know the length of any reply.
_REPLY_PREFIX_SIZE = 5
_MAX_FIELD = 255


class AuthMethod(IntEnum):
    """Authentication methods (RFC 1928 section 3)."""

    NO_AUTHENTICATION = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class Command(IntEnum):
    """Request commands (RFC 1928 section 4)."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    """ATYP values (RFC 1928 section 5)."""

    IPV4 = 0x01
    DOMAIN_NAME = 0x03
    IPV6 = 0x04


_ADDRESS_TYPES = frozenset(AddressType)


class ReplyCode(IntEnum):
    """REP values (RFC 1928 section 6); 0x09..0xFF are unassigned."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    CONNECTION_NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08

    @property
    def description(self) -> str:
        return _REPLY_DESCRIPTIONS[self]


_REPLY_DESCRIPTIONS = {
    ReplyCode.SUCCEEDED: "succeeded",
    ReplyCode.GENERAL_FAILURE: "general SOCKS server failure",
    ReplyCode.CONNECTION_NOT_ALLOWED: "connection not allowed by ruleset",
    ReplyCode.NETWORK_UNREACHABLE: "network unreachable",
    ReplyCode.HOST_UNREACHABLE: "host unreachable",
    ReplyCode.CONNECTION_REFUSED: "connection refused",
    ReplyCode.TTL_EXPIRED: "TTL expired",
    ReplyCode.COMMAND_NOT_SUPPORTED: "command not supported",
    ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}


def describe_reply(code: int) -> str:
    """Human text for any REP byte, including unassigned ones."""
    try:
        return ReplyCode(code).description
    except ValueError:
        return f"unassigned reply code 0x{code:02x}"


class Socks5WireError(Exception):
    """The server sent bytes that are not valid SOCKS5 at this point of the conversation."""


class Reply(NamedTuple):
    """A parsed reply; ``reply_code`` is a ``ReplyCode`` when the value is assigned."""

    reply_code: int
    bound_host: str
    bound_port: int
    bytes_consumed: int


Host = str | IPv4Address | IPv6Address
Buffer = bytes | bytearray | memoryview


# --- client messages ---------------------------------------------------------------------------


def build_greeting(methods: Sequence[int]) -> bytes:
    """VER NMETHODS METHODS (RFC 1928 section 3)."""
    if not 1 <= len(methods) <= _MAX_FIELD:
        raise ValueError(f"a greeting offers 1..255 methods, got {len(methods)}")
    if any(not 0 <= m <= 0xFF for m in methods):
        raise ValueError("an authentication method is one byte")
    return bytes((SOCKS_VERSION, len(methods), *methods))


def build_auth(username: str, password: str) -> bytes:
    """VER ULEN UNAME PLEN PASSWD (RFC 1929 section 2). Text is sent as UTF-8."""
    uname = username.encode()
    passwd = password.encode()
    # The messages name the field and its length only: never its content.
    if not 1 <= len(uname) <= _MAX_FIELD:
        raise ValueError(f"SOCKS5 username must be 1..255 bytes, got {len(uname)}")
    if not 1 <= len(passwd) <= _MAX_FIELD:
        raise ValueError(f"SOCKS5 password must be 1..255 bytes, got {len(passwd)}")
    return bytes((AUTH_VERSION, len(uname))) + uname + bytes((len(passwd),)) + passwd


def encode_address(host: Host, port: int) -> bytes:
    """ATYP ADDR PORT (RFC 1928 section 5), shared by requests, replies and UDP headers.

    A string that is an IP literal is sent as that address; any other string is a domain name,
    sent as ASCII (IDNA for non-ASCII names) for the proxy to resolve.
    """
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be 0..65535, got {port}")
    if isinstance(host, str):
        host = _as_ip_if_literal(host)
    if isinstance(host, IPv4Address):
        return bytes((AddressType.IPV4,)) + host.packed + port.to_bytes(2, "big")
    if isinstance(host, IPv6Address):
        return bytes((AddressType.IPV6,)) + host.packed + port.to_bytes(2, "big")
    name = _encode_domain(host)
    return bytes((AddressType.DOMAIN_NAME, len(name))) + name + port.to_bytes(2, "big")


def build_request(command: Command, host: Host, port: int) -> bytes:
    """VER CMD RSV ATYP DST.ADDR DST.PORT (RFC 1928 section 4)."""
    return bytes((SOCKS_VERSION, command, 0)) + encode_address(host, port)


def build_connect(host: Host, port: int) -> bytes:
    return build_request(Command.CONNECT, host, port)


def build_udp_associate(host: Host, port: int) -> bytes:
    """The address is where the client will send datagrams from; zeros when not known yet."""
    return build_request(Command.UDP_ASSOCIATE, host, port)


def build_reply(reply_code: int, bound_host: Host, bound_port: int) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT (RFC 1928 section 6): the server side, for tests."""
    if not 0 <= reply_code <= 0xFF:
        raise ValueError("a reply code is one byte")
    return bytes((SOCKS_VERSION, reply_code, 0)) + encode_address(bound_host, bound_port)


# --- server messages ---------------------------------------------------------------------------


def parse_method_selection(data: Buffer) -> int:
    """The method the server chose; ``AuthMethod.NO_ACCEPTABLE_METHODS`` when it chose none."""
    if len(data) != METHOD_SELECTION_SIZE:
        raise ValueError(f"a method selection is {METHOD_SELECTION_SIZE} bytes, got {len(data)}")
    version, method = data[0], data[1]
    if version != SOCKS_VERSION:
        raise Socks5WireError(f"method selection has version {version}, expected 5")
    try:
        return AuthMethod(method)
    except ValueError:
        return method


def parse_auth_reply(data: Buffer) -> int:
    """The RFC 1929 STATUS byte: 0 is success, anything else is a rejection."""
    if len(data) != AUTH_REPLY_SIZE:
        raise ValueError(f"an authentication reply is {AUTH_REPLY_SIZE} bytes, got {len(data)}")
    version, status = data[0], data[1]
    if version != AUTH_VERSION:
        raise Socks5WireError(f"authentication reply has version {version}, expected 1")
    return status


def reply_bytes_missing(data: Buffer) -> int:
    """How many more bytes the reply starting at ``data[0]`` needs; 0 once it is complete.

    Reading exactly this many bytes never reads past the reply. Validates what it has seen so
    far, so a wrong version fails on the first byte.
    """
    have = len(data)
    if have >= 1 and data[0] != SOCKS_VERSION:
        raise Socks5WireError(f"reply has version {data[0]}, expected 5")
    # RSV (data[2]) is not checked: RFC 1928 gives the receiver no rule for it.
    if have < 4:
        return _REPLY_PREFIX_SIZE - have
    if _failure_without_address(data):
        return 0
    size = _address_size(data, 3)
    if size is None:
        return _REPLY_PREFIX_SIZE - have
    return max(0, 3 + size - have)


def parse_reply(data: Buffer) -> Reply | None:
    """The reply at the start of ``data``, or None when more bytes are needed.

    Bytes after the reply are not looked at; ``bytes_consumed`` says where the reply ends.
    """
    if reply_bytes_missing(data) > 0:
        return None
    if _failure_without_address(data):
        return Reply(_reply_code(data[1]), "", 0, 4)
    parsed = parse_address(data, 3)
    if parsed is None:  # cannot happen: reply_bytes_missing() said the address is complete
        return None
    host, port, end = parsed
    return Reply(_reply_code(data[1]), host, port, end)


def _reply_code(code: int) -> int:
    try:
        return ReplyCode(code)
    except ValueError:
        return code


def _failure_without_address(data: Buffer) -> bool:
    """A failure reply whose ATYP is no address type (servers send 0 with a zero address):
    its REP is what matters, and nothing after it will be read, as the server closes."""
    return data[1] != ReplyCode.SUCCEEDED and data[3] not in _ADDRESS_TYPES


def parse_address(data: Buffer, offset: int = 0) -> tuple[str, int, int] | None:
    """ATYP ADDR PORT at ``offset``: (host, port, end offset), or None when incomplete."""
    size = _address_size(data, offset)
    if size is None or len(data) < offset + size:
        return None
    atyp = data[offset]
    end = offset + size
    port = int.from_bytes(data[end - 2 : end], "big")
    if atyp == AddressType.IPV4:
        return str(IPv4Address(bytes(data[offset + 1 : offset + 5]))), port, end
    if atyp == AddressType.IPV6:
        return str(IPv6Address(bytes(data[offset + 1 : offset + 17]))), port, end
    raw = bytes(data[offset + 2 : end - 2])
    try:
        return raw.decode("ascii"), port, end
    except UnicodeDecodeError:
        raise Socks5WireError("domain name in address is not ASCII") from None


# --- UDP relay datagrams (RFC 1928 section 7) --------------------------------------------------


def build_udp_datagram(host: Host, port: int, payload: Buffer) -> bytes:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA: one datagram for the proxy's UDP relay.

    FRAG is always 0: we never fragment at the SOCKS layer (section 7 makes it optional).
    """
    return b"\0\0\0" + encode_address(host, port) + bytes(payload)


def parse_udp_datagram(data: Buffer) -> tuple[str, int, memoryview]:
    """(host, port, payload) of a datagram from the relay; the address is the remote peer's.

    Raises ``Socks5WireError`` for a truncated header or FRAG other than 0: section 7 says an
    implementation that does not reassemble MUST drop such datagrams.
    """
    if len(data) < 4:
        raise Socks5WireError(f"UDP relay datagram of {len(data)} bytes is shorter than a header")
    if data[2] != 0:
        raise Socks5WireError(f"UDP relay datagram is a SOCKS fragment (FRAG {data[2]})")
    parsed = parse_address(data, 3)
    if parsed is None:
        raise Socks5WireError("UDP relay datagram ends inside its address")
    host, port, end = parsed
    return host, port, memoryview(data)[end:]


# --- helpers -----------------------------------------------------------------------------------


def _address_size(data: Buffer, offset: int) -> int | None:
    """Size of ATYP ADDR PORT at ``offset``, or None when too few bytes are there to tell."""
    if len(data) <= offset:
        return None
    atyp = data[offset]
    if atyp == AddressType.IPV4:
        return 1 + 4 + 2
    if atyp == AddressType.IPV6:
        return 1 + 16 + 2
    if atyp == AddressType.DOMAIN_NAME:
        if len(data) <= offset + 1:
            return None
        length = data[offset + 1]
        if length == 0:
            raise Socks5WireError("empty domain name in address")
        return 1 + 1 + length + 2
    raise Socks5WireError(f"unknown address type {atyp}")


def _as_ip_if_literal(host: str) -> str | IPv4Address | IPv6Address:
    try:
        return ip_address(host)
    except ValueError:
        return host


def _encode_domain(name: str) -> bytes:
    try:
        # ASCII names go as written (a proxy may accept names IDNA would refuse, like "_x").
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        try:
            raw = name.encode("idna")
        except UnicodeError as exc:
            raise ValueError(f"cannot IDNA-encode domain name {name!r}: {exc}") from None
    if not 1 <= len(raw) <= _MAX_FIELD:
        raise ValueError(f"domain name must be 1..255 bytes, got {len(raw)}")
    return raw


__all__ = [
    "AUTH_REPLY_SIZE",
    "AUTH_VERSION",
    "METHOD_SELECTION_SIZE",
    "SOCKS_VERSION",
    "AddressType",
    "AuthMethod",
    "Command",
    "Host",
    "Reply",
    "ReplyCode",
    "Socks5WireError",
    "build_auth",
    "build_connect",
    "build_greeting",
    "build_reply",
    "build_request",
    "build_udp_associate",
    "build_udp_datagram",
    "describe_reply",
    "encode_address",
    "parse_address",
    "parse_auth_reply",
    "parse_method_selection",
    "parse_reply",
    "parse_udp_datagram",
    "reply_bytes_missing",
]
