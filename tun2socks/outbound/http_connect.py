"""A TCP stream through an HTTP proxy by CONNECT (RFC 9110 section 9.3.6; Basic auth RFC 7617).

Theory of operation: as ``socks5.connect``: resolve the proxy (an IP literal skips the
resolver), connect a non-blocking socket with ``loop.sock_connect``, send the request built by
the sans-IO ``http_connect_wire`` and read the response head, all under one ``asyncio.timeout``.
The head is read with ``MSG_PEEK`` and then consumed to its exact length, so bytes the
destination sends right after the proxy's ``200`` stay in the socket for the relay.

Failures raise one ``HttpProxyError`` subclass per cause; they are ``Socks5Error`` subclasses
of the same kind (unreachable, auth_failed, protocol_error, timeout), so that every caller that
handles SOCKS5 failures handles these too, and they word their messages for HTTP. A 407 says
"authentication failed" (naming the user, never the password), as does 401; any other non-2xx
answer is a refusal quoting the status line. Nothing is logged here.
"""

from __future__ import annotations

import asyncio
import os
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Protocol

from tun2socks.outbound.http_connect_wire import (
    MAX_HEAD,
    HttpWireError,
    ResponseHead,
    build_connect,
    parse_response_head,
)
from tun2socks.outbound.socks5 import (
    ProxyEndpoint,
    SocketHook,
    Socks5AuthFailed,
    Socks5Error,
    Socks5ProtocolError,
    Socks5ProxyUnreachable,
    Socks5Timeout,
    format_host_port,
)

# 407 Proxy Authentication Required (RFC 9110 section 15.5.8); some proxies (tinyproxy 1.11)
# answer a CONNECT with wrong credentials with 401 Unauthorized instead: the same cause.
AUTH_STATUSES = (407, 401)


class HttpProxyError(Socks5Error):
    """A CONNECT through an HTTP proxy failed; ``str()`` is one line, without the password."""

    def __str__(self) -> str:
        return f"HTTP proxy {self.proxy}: {self.command} {self.target} failed: {self.reason}"


class HttpProxyUnreachable(HttpProxyError, Socks5ProxyUnreachable):
    """The proxy itself could not be resolved or connected to."""


class HttpProxyAuthFailed(HttpProxyError, Socks5AuthFailed):
    """407: the proxy wants credentials, or rejected the ones sent."""


class HttpProxyProtocolError(HttpProxyError, Socks5ProtocolError):
    """The proxy's answer is not HTTP, or it closed the connection before answering."""


class HttpProxyTimeout(HttpProxyError, Socks5Timeout):
    """Connect plus CONNECT did not finish within the timeout."""


class HttpProxyRefused(HttpProxyError):
    """The proxy answered CONNECT with a status other than 2xx and 407."""

    kind = "refused"

    @property
    def status(self) -> int | None:
        return self.reply_code


def credentials_of(proxy: ProxyEndpoint) -> tuple[str, str] | None:
    if proxy.username is None:
        return None
    return proxy.username, proxy.password or ""


def refusal(head: ResponseHead, username: str | None) -> tuple[type[HttpProxyError], str]:
    """The error class and reason for a non-2xx answer (shared with ``tun2socks check``)."""
    if head.status in AUTH_STATUSES:
        if username is None:
            reason = (
                f"the proxy requires authentication ({head.status_line}): "
                "put user:password in the URL"
            )
        else:
            reason = f"authentication failed for user {username!r} ({head.status_line})"
        return HttpProxyAuthFailed, reason
    return HttpProxyRefused, f"refused by the proxy: {head.status_line}"


async def connect(
    proxy: ProxyEndpoint,
    dst_host: str | IPv4Address | IPv6Address,
    dst_port: int,
    *,
    timeout: float,
    prepare_socket: SocketHook | None = None,
) -> socket.socket:
    """A socket tunnelled through ``proxy`` to ``dst_host:dst_port`` (non-blocking, TCP_NODELAY).

    ``dst_host`` may be an IP or a name the proxy resolves; ``timeout`` bounds everything;
    ``prepare_socket`` runs before connecting (``SO_MARK`` and the like). Raises an
    ``HttpProxyError`` subclass, or ``ValueError`` for an unusable destination.
    """
    try:
        request = build_connect(dst_host, dst_port, credentials_of(proxy))
    except HttpWireError as exc:
        raise ValueError(str(exc)) from None
    target = format_host_port(dst_host, dst_port)
    loop = asyncio.get_running_loop()
    phase = ["resolving the proxy host"]

    def error(cls: type[HttpProxyError], reason: str, status: int | None = None) -> HttpProxyError:
        return cls(reason, proxy.address, target, "CONNECT", status)

    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            sock = await _connect_to_proxy(loop, proxy, prepare_socket, phase, error)
            phase[0] = "sending CONNECT"
            try:
                await loop.sock_sendall(sock, request)
                phase[0] = "waiting for the CONNECT answer"
                head = await _read_head(loop, sock)
            except OSError as exc:
                raise error(HttpProxyProtocolError, f"{_reason(exc)} while {phase[0]}") from None
            except HttpWireError as exc:
                raise error(HttpProxyProtocolError, str(exc)) from None
            if head is None:
                reason = f"the proxy closed the connection while {phase[0]}"
                raise error(HttpProxyProtocolError, reason)
            if not head.is_success:
                cls, reason = refusal(head, proxy.username)
                raise error(cls, reason, head.status)
    except TimeoutError:
        if sock is not None:
            sock.close()
        raise error(HttpProxyTimeout, f"timed out after {timeout:g} s {phase[0]}") from None
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    return sock


async def _connect_to_proxy(
    loop: asyncio.AbstractEventLoop,
    proxy: ProxyEndpoint,
    prepare_socket: SocketHook | None,
    phase: list[str],
    error: _ErrorFactory,
) -> socket.socket:
    try:
        ip = ip_address(proxy.host)
        version = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        candidates: list[tuple[int, tuple[str, int]]] = [(version, (proxy.host, proxy.port))]
    except ValueError:
        try:
            infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            reason = f"cannot resolve proxy host: {_reason(exc)}"
            raise error(HttpProxyUnreachable, reason) from None
        candidates = [(info[0], (str(info[4][0]), int(info[4][1]))) for info in infos]
    last = "no address"
    phase[0] = "connecting to the proxy"
    for family, sockaddr in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if prepare_socket is not None:
                prepare_socket(sock)
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            last = _reason(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error(HttpProxyUnreachable, f"cannot reach proxy: {last}")


class _ErrorFactory(Protocol):
    def __call__(
        self, cls: type[HttpProxyError], reason: str, status: int | None = None
    ) -> HttpProxyError: ...


async def _read_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> ResponseHead | None:
    """The response head, consumed to its last byte and not one byte further; None on EOF."""
    received = bytearray()
    while True:
        await _readable(loop, sock)
        try:
            peeked = sock.recv(MAX_HEAD + 4 - len(received), socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not peeked:
            return None
        head = parse_response_head(received + peeked)
        if head is None:
            received += sock.recv(len(peeked))  # all of it belongs to the head
            continue
        rest = head.length - len(received)
        while rest > 0:  # peeked bytes are in the buffer: this does not block
            rest -= len(sock.recv(rest))
        return head


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    return os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)


__all__ = [
    "HttpProxyAuthFailed",
    "HttpProxyError",
    "HttpProxyProtocolError",
    "HttpProxyRefused",
    "HttpProxyTimeout",
    "HttpProxyUnreachable",
    "connect",
    "credentials_of",
    "refusal",
]
