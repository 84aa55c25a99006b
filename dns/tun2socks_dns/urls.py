"""Upstream URLs (``dns.upstreams`` in the config) parsed into values; pure, no I/O.

    tcp://IP[:port]            DNS over TCP through the SOCKS5 proxy (RFC 7766)
    udp://IP[:port]            DNS over UDP through SOCKS5 UDP ASSOCIATE; TCP when truncated
    https://host[:port]/path   DNS over HTTPS (RFC 8484), its connection through the proxy
    direct://IP[:port]         DNS over UDP (TCP when truncated) from a plain local socket

Addresses are IP literals: resolving a resolver's name would itself need a resolver. A DoH
host may be a name: the proxy resolves it (SOCKS5 ATYP=DOMAINNAME), nothing leaks locally.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Literal
from urllib.parse import urlsplit

DNS_PORT = 53  # RFC 1035 section 4.2
HTTPS_PORT = 443

Scheme = Literal["tcp", "udp", "https", "direct"]
SCHEMES: tuple[Scheme, ...] = ("tcp", "udp", "https", "direct")


@dataclass(frozen=True)
class UpstreamUrl:
    scheme: Scheme
    host: str  # an IP literal, or for https a name or a literal
    port: int
    path: str = ""  # https only

    @property
    def address(self) -> IPv4Address | IPv6Address | None:
        try:
            return ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def _shown(text: str) -> str:
    """``text`` fit for an error message: credentials a URL may carry are never echoed."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)?.*@", r"\1***@", text) if "@" in text else text


def parse_upstream(text: str) -> UpstreamUrl:
    """Parse one upstream URL; ValueError with a message fit for a config error."""
    if "://" not in text:
        raise ValueError(
            f"must be a URL like tcp://9.9.9.9 ({', '.join(SCHEMES)}) (got {_shown(text)!r})"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc} (got {_shown(text)!r})") from None
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)} (got {_shown(text)!r})")
    if parts.username is not None or parts.query or parts.fragment:
        raise ValueError(f"must not hold credentials, a query or a fragment (got {_shown(text)!r})")
    if not host:
        raise ValueError(f"has no host (got {_shown(text)!r})")
    if scheme == "https":
        if port is None:
            port = HTTPS_PORT
        return UpstreamUrl("https", host, port, parts.path or "/dns-query")
    try:
        ip_address(host)
    except ValueError:
        raise ValueError(
            f"{scheme}:// needs an IP address, not a name (got {_shown(text)!r})"
        ) from None
    if parts.path not in ("", "/"):
        raise ValueError(f"{scheme}:// takes no path (got {_shown(text)!r})")
    return UpstreamUrl(scheme, host, port if port is not None else DNS_PORT)
