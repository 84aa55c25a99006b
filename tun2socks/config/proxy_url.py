"""The proxy URL: ``${VAR}`` expansion from the environment and parsing of
``socks5://[user[:password]@]host:port`` into scheme, host, port and credentials, or of
``direct://`` (the bypass mode: no proxy, every flow out on a protected socket of its own).

Messages raised here never quote the URL: any part of it might be the password.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address
from typing import Protocol
from urllib.parse import quote, unquote

from pydantic import SecretStr

MAX_AUTH_FIELD = 255  # RFC 1929: UNAME and PASSWD are 1..255 bytes
URL_SHAPE = "socks5://[user[:password]@]host:port (or http:// for an HTTP CONNECT proxy)"
DIRECT = "direct"  # direct://: no host, no port, no credentials


@dataclass(frozen=True)
class ParsedProxyUrl:
    scheme: str
    host: str
    port: int
    username: str | None
    password: SecretStr | None = field(repr=False)


_VAR_REF = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")


def expand_variables(text: str, environ: Mapping[str, str], *, verbatim: bool) -> str:
    """Replace each ``${NAME}``; with ``verbatim`` the value is percent-encoded so that the
    percent-decoding which follows gives it back unchanged."""
    if "${" in _VAR_REF.sub("", text):
        raise ValueError("has a '${' without its closing '}'")

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if not _VAR_NAME.fullmatch(name):
            raise ValueError("has a ${...} that is not ${NAME} (letters, digits, '_')")
        value = environ.get(name)
        if value is None:
            raise ValueError(f"environment variable {name} is not set")
        return quote(value, safe="") if verbatim else value

    return _VAR_REF.sub(substitute, text)


def _credential(text: str, what: str) -> str:
    try:
        value = unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not percent-encoded UTF-8") from None
    if not value and what == "user name":
        raise ValueError("user name is empty")
    if len(value.encode()) > MAX_AUTH_FIELD:
        raise ValueError(f"{what} is longer than {MAX_AUTH_FIELD} bytes (RFC 1929)")
    return value


def _valid_host_name(host: str) -> bool:
    name = host.removesuffix(".")
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(p) for p in name.split("."))


def parse_host_port(host_port: str) -> tuple[str, int]:
    if host_port.startswith("["):
        host, bracket, rest = host_port[1:].partition("]")
        if not bracket:
            raise ValueError("has a '[' without its closing ']'")
        try:
            IPv6Address(host)
        except ValueError:
            raise ValueError("has something in [...] that is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"has no port: {URL_SHAPE}")
        port_text = rest[1:]
    else:
        host, colon, port_text = host_port.rpartition(":")
        if not colon:
            raise ValueError(f"has no port: {URL_SHAPE}")
        if ":" in host:
            raise ValueError("has an IPv6 address outside brackets: write [::1]:1080")
        if not host:
            raise ValueError(f"has no host: {URL_SHAPE}")
        try:
            ip_address(host)
        except ValueError:
            if not _valid_host_name(host):
                raise ValueError(
                    "has a host that is neither an IP address nor a DNS name"
                ) from None
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError("port must be a number from 1 to 65535")
    return host, int(port_text)


def parse_proxy_url(url: str, environ: Mapping[str, str]) -> ParsedProxyUrl:
    """Expand ``${VAR}`` and parse ``socks5://[user[:password]@]host:port``.

    A variable inside the user name or password is taken verbatim (no percent-decoding), so a
    password holding '@' or ':' can come from the environment as it is. A URL written with no
    '://' (a whole ``${PROXY_URL}``) is expanded first and must then be a percent-encoded URL.
    """

    def expand(text: str, *, verbatim: bool = False) -> str:
        return expand_variables(text, environ, verbatim=verbatim)

    def as_is(text: str, *, verbatim: bool = False) -> str:
        return text

    if "://" in url:
        return _split_url(url, expand)
    expanded = expand(url)
    if "://" not in expanded:
        raise ValueError(f"must look like {URL_SHAPE}")
    return _split_url(expanded, as_is)


class _Expander(Protocol):
    def __call__(self, text: str, *, verbatim: bool = False) -> str: ...


def _split_url(url: str, expand: _Expander) -> ParsedProxyUrl:
    # Split on the text as written: a variable's value cannot move the delimiters.
    scheme_raw, _, rest = url.partition("://")
    scheme = expand(scheme_raw).lower()
    if scheme == DIRECT:
        if expand(rest) not in ("", "/"):
            raise ValueError("direct:// takes no host, port or credentials (it has no proxy)")
        return ParsedProxyUrl(DIRECT, "", 0, None, None)
    if scheme not in ("socks5", "socks5h", "http"):
        raise ValueError(
            "scheme must be socks5://, socks5h:// or http:// (HTTP CONNECT), "
            "or direct:// (no proxy)"
        )
    # rpartition: a password with an unencoded '@' still splits at the host.
    user_info, at, host_port_raw = rest.removesuffix("/").rpartition("@")
    username = password = None
    if at:
        user_raw, colon, password_raw = user_info.partition(":")
        username = _credential(expand(user_raw, verbatim=True), "user name")
        if colon:
            password = SecretStr(_credential(expand(password_raw, verbatim=True), "password"))
    if scheme == "http" and username is not None and ":" in username:
        raise ValueError("user name of an http:// proxy cannot contain ':' (RFC 7617)")
    host_port = expand(host_port_raw)
    if any(c in host_port for c in "/?#%@"):
        raise ValueError(f"must not have a path, query or fragment: {URL_SHAPE}")
    host, port = parse_host_port(host_port)
    return ParsedProxyUrl("http" if scheme == "http" else "socks5", host, port, username, password)


_USERINFO_PASSWORD = re.compile(r"(://[^/@:]*:).*@")


def hide_url_password(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@`` in it shown as ``***``:
    for error messages that echo a value."""
    return _USERINFO_PASSWORD.sub(r"\1***@", text)
