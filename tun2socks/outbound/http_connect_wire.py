"""The HTTP CONNECT handshake as bytes in, values out (sans-IO): the request and the response head.

RFC 9110 section 9.3.6: the client sends ``CONNECT host:port HTTP/1.1`` with the target in
authority form (an IPv6 literal in brackets) and a ``Host`` field of the same value; any 2xx
answer turns the connection into a tunnel right after the response's header section (a 2xx
answer to CONNECT has no content), anything else is a refusal. Credentials go in
``Proxy-Authorization`` with the Basic scheme (RFC 7617: base64 of ``user-id:password`` in
UTF-8; a user-id cannot contain ':'); 407 means the proxy wants (other) credentials
(RFC 9110 section 15.5.8).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

MAX_HEAD = 16 * 1024  # a proxy's answer head is a few hundred bytes; more is not a proxy
HEAD_END = b"\r\n\r\n"
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([\x20-\x7e\t]*))?")
_HOST_CHARS = re.compile(r"[A-Za-z0-9._-]+")


class HttpWireError(ValueError):
    """The bytes are not an acceptable HTTP/1.x response head, or a value cannot be sent."""


@dataclass(frozen=True)
class ResponseHead:
    """The parsed head: status code, reason phrase and the head's length in bytes."""

    status: int
    reason: str
    length: int

    @property
    def status_line(self) -> str:
        return f"{self.status} {self.reason}".rstrip()

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300


def authority(host: str | IPv4Address | IPv6Address, port: int) -> str:
    """The authority form ``host:port`` (``[v6]:port``) of RFC 9110 section 9.3.6."""
    if not 0 < port <= 0xFFFF:
        raise HttpWireError(f"port must be 1..65535, got {port}")
    text = str(host)
    try:
        address = ip_address(text)
    except ValueError:
        if not _HOST_CHARS.fullmatch(text) or len(text) > 255:
            raise HttpWireError("host is neither an IP address nor a DNS name") from None
        return f"{text}:{port}"
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def basic_credentials(username: str, password: str) -> str:
    """The ``Proxy-Authorization`` value for Basic authentication (RFC 7617 section 2)."""
    if ":" in username:
        raise HttpWireError("a user name for Basic authentication cannot contain ':'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in username + password):
        raise HttpWireError("user name and password cannot contain control characters")
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def build_connect(
    host: str | IPv4Address | IPv6Address,
    port: int,
    credentials: tuple[str, str] | None = None,
) -> bytes:
    """The whole CONNECT request; with ``credentials`` (user, password) it carries Basic auth."""
    target = authority(host, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if credentials is not None:
        lines.append(f"Proxy-Authorization: {basic_credentials(*credentials)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_response_head(data: bytes | bytearray) -> ResponseHead | None:
    """The response head at the start of ``data``, or None while it is incomplete.

    Raises HttpWireError for a head longer than MAX_HEAD or a status line that is not
    ``HTTP/1.x NNN reason``. Header fields are not needed (a 2xx tunnel has no content, and
    the connection is closed after any other answer), so only the status line is parsed.
    """
    end = data.find(HEAD_END, 0, MAX_HEAD + len(HEAD_END))
    if end < 0:
        if len(data) > MAX_HEAD:
            raise HttpWireError(f"response head longer than {MAX_HEAD} bytes")
        # Reject a non-HTTP answer (a SOCKS server, say) as soon as its first bytes arrive.
        if len(data) >= 5 and not bytes(data[:5]) == b"HTTP/":
            raise HttpWireError("the answer is not HTTP")
        return None
    first_line = bytes(data[: data.find(b"\r\n")])
    match = _STATUS_LINE.fullmatch(first_line)
    if match is None:
        shown = first_line[:60].decode("ascii", "replace")
        raise HttpWireError(f"not an HTTP/1.x status line: {shown!r}")
    reason = (match.group(2) or b"").decode("ascii").strip()
    return ResponseHead(int(match.group(1)), reason, end + len(HEAD_END))


__all__ = [
    "MAX_HEAD",
    "HttpWireError",
    "ResponseHead",
    "authority",
    "basic_credentials",
    "build_connect",
    "parse_response_head",
]
