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

    @property
    def kind(self) -> str:  # type: ignore[override]  # per instance: the status names it
        return f"http_{self.reply_code}" if self.reply_code is not None else "refused"

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
    attempt = _Attempt(proxy, format_host_port(dst_host, dst_port))
    try:
        async with asyncio.timeout(timeout):
            return await attempt.run(request, prepare_socket)
    except TimeoutError:
        attempt.close()
        reason = f"timed out after {timeout:g} s {attempt.phase}"
        raise attempt.error(HttpProxyTimeout, reason) from None
    except BaseException:
        attempt.close()
        raise


class _Attempt:
    """One CONNECT in progress: its socket, the step it is in, how to word its errors."""

    def __init__(self, proxy: ProxyEndpoint, target: str) -> None:
        self.proxy = proxy
        self.target = target
        self.sock: socket.socket | None = None
        self.phase = "resolving the proxy host"
        self.loop = asyncio.get_running_loop()

    def error(
        self, cls: type[HttpProxyError], reason: str, status: int | None = None
    ) -> HttpProxyError:
        return cls(reason, self.proxy.address, self.target, "CONNECT", status)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    async def run(self, request: bytes, prepare_socket: SocketHook | None) -> socket.socket:
        sock = self.sock = await self._connect_to_proxy(prepare_socket)
        try:
            self.phase = "sending CONNECT"
            await self.loop.sock_sendall(sock, request)
            self.phase = "waiting for the CONNECT answer"
            head = await _read_head(self.loop, sock)
        except OSError as exc:
            raise self.error(HttpProxyProtocolError, f"{_reason(exc)} while {self.phase}") from None
        except HttpWireError as exc:
            raise self.error(HttpProxyProtocolError, str(exc)) from None
        if head is None:
            reason = f"the proxy closed the connection while {self.phase}"
            raise self.error(HttpProxyProtocolError, reason)
        if not head.is_success:
            cls, reason = refusal(head, self.proxy.username)
            raise self.error(cls, reason, head.status)
        return sock

    async def _connect_to_proxy(self, prepare_socket: SocketHook | None) -> socket.socket:
        host, port = self.proxy.host, self.proxy.port
        try:
            version = socket.AF_INET6 if ip_address(host).version == 6 else socket.AF_INET
            candidates: list[tuple[int, tuple[str, int]]] = [(version, (host, port))]
        except ValueError:  # a name: the resolver's answers, in its order
            try:
                infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                reason = f"cannot resolve proxy host: {_reason(exc)}"
                raise self.error(HttpProxyUnreachable, reason) from None
            candidates = [(info[0], (str(info[4][0]), int(info[4][1]))) for info in infos]
        last = "no address"
        self.phase = "connecting to the proxy"
        for family, sockaddr in candidates:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if prepare_socket is not None:
                    prepare_socket(sock)
                await self.loop.sock_connect(sock, sockaddr)
            except OSError as exc:
                sock.close()
                last = _reason(exc)
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise self.error(HttpProxyUnreachable, f"cannot reach proxy: {last}")


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
