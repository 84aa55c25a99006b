"""Open a TCP stream through a SOCKS5 proxy (RFC 1928 CONNECT, RFC 1929 username/password).

Theory of operation: ``connect`` resolves the proxy (an IP literal skips the resolver), connects
a non-blocking socket with ``loop.sock_connect`` and runs the handshake with ``loop.sock_sendall``
and ``loop.sock_recv``, all under one ``asyncio.timeout``. The messages come from the sans-IO
``socks5_wire``. It offers a single method (0x02 with credentials, 0x00 without), so it knows
what the server must choose; with ``pipeline`` it sends greeting, auth and CONNECT in one write,
then reads the replies in order: one round trip instead of three (``pipeline_probe.py`` finds
out whether a server can take that). Replies are read with exact sizes, so nothing past the
CONNECT reply is consumed: bytes the destination sends early stay in the socket for the relay,
and ``connect`` returns a plain ``(socket, bound address)``.

``open_session`` does the login only, and ``connect_on_session`` the CONNECT on such a session
later (the session pool, ``session_pool.py``); a session that turns out dead raises
``Socks5SessionLost``, so that the caller can dial afresh.

Failures raise one ``Socks5Error`` subclass per cause; the socket is closed first. Nothing is
logged here (the caller logs once), and no message or repr contains the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Protocol, TypeVar

from tun2socks.outbound.socks5_wire import (
    AUTH_REPLY_SIZE,
    METHOD_SELECTION_SIZE,
    SOCKS_VERSION,
    AuthMethod,
    Command,
    ReplyCode,
    Socks5WireError,
    build_auth,
    build_greeting,
    build_request,
    describe_reply,
    parse_auth_reply,
    parse_method_selection,
    parse_reply,
    reply_bytes_missing,
)

SocketHook = Callable[[socket.socket], None]
# Told each login's round trip in seconds (greeting sent to method selection received).
RoundTripObserver = Callable[[float], None]
T = TypeVar("T")
# linux/tcp.h: connect() returns at once and the first write goes out in the SYN (Linux 4.11).
TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)


# --- errors --------------------------------------------------------------------------------------


class Socks5Error(Exception):
    """A SOCKS5 request failed. ``str()`` is one line naming proxy, request and cause.

    ``reply_code`` is the server's REP byte for ``Socks5ReplyError`` and None otherwise;
    ``kind`` is a stable short label: the key under which the engine counts the refused flow
    (``upstream_errors`` in the API, the ``kind`` label of ``tun2socks_upstream_errors``).
    """

    kind: str = "dial_failed"

    def __init__(
        self,
        reason: str,
        proxy: str,
        target: str,
        command: str = "CONNECT",
        reply_code: int | None = None,
    ) -> None:
        # Positional arguments only, so that pickling (args) rebuilds the same error.
        super().__init__(reason, proxy, target, command, reply_code)
        self.reason = reason
        self.proxy = proxy
        self.target = target
        self.command = command
        self.reply_code = reply_code

    def __str__(self) -> str:
        text = f"SOCKS5 proxy {self.proxy}: {self.command} {self.target} failed: {self.reason}"
        if self.reply_code is not None:
            text += f" (reply {self.reply_code})"
        return text


class Socks5ProxyUnreachable(Socks5Error):
    """The proxy itself could not be resolved or connected to."""

    kind = "proxy_unreachable"


class Socks5AuthFailed(Socks5Error):
    """The proxy rejected the credentials, or accepted none of the offered methods."""

    kind = "auth_failed"


class Socks5ProtocolError(Socks5Error):
    """The proxy sent invalid bytes, or closed or reset the connection mid-handshake."""

    kind = "protocol_error"


class Socks5Timeout(Socks5Error):
    """Connect plus handshake did not finish within the timeout."""

    kind = "timeout"


class Socks5ReplyError(Socks5Error):
    """The proxy answered the request with a failure reply; ``reply_code`` says which.

    Its ``kind`` names the reply (RFC 1928 section 6), e.g. ``connection_refused``, or
    ``reply_N`` for an unassigned value N."""

    @property
    def kind(self) -> str:  # type: ignore[override]  # per instance: the reply names it
        return reply_kind(self.reply_code)


def reply_kind(reply_code: int | None) -> str:
    """The counter key of a failure reply: the REP name in lower case, or ``reply_N``."""
    if reply_code is None:
        return Socks5Error.kind
    if reply_code in ReplyCode.__members__.values():
        return ReplyCode(reply_code).name.lower()
    return f"reply_{reply_code}"


# --- the proxy -----------------------------------------------------------------------------------


class _SecretValue(Protocol):
    def get_secret_value(self) -> str: ...


class ProxySettings(Protocol):
    """What ``ProxyEndpoint.from_config`` reads; ``tun2socks.config.ProxyConfig`` has it."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> _SecretValue | None: ...
    @property
    def scheme(self) -> str: ...


@dataclass(frozen=True)
class ProxyEndpoint:
    """Where the proxy is and how to log in; ``host`` may be a name or an IP literal.

    ``scheme`` is "socks5", or "http" for an HTTP CONNECT proxy (``outbound/http_connect.py``),
    or "direct" for direct:// (no proxy: no host, port 0; ``outbound/direct.py``).
    """

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    scheme: str = "socks5"

    def __post_init__(self) -> None:
        if self.scheme == "direct":
            return
        if not 0 < self.port <= 0xFFFF:
            raise ValueError(f"SOCKS5 proxy port must be 1..65535, got {self.port}")
        if (self.username is None) != (self.password is None):
            raise ValueError("SOCKS5 username and password must be given together")
        if self.username is not None and self.password is not None:
            build_auth(self.username, self.password)  # length checks now, not on every flow

    @classmethod
    def from_config(cls, proxy: ProxySettings) -> ProxyEndpoint:
        password = proxy.password.get_secret_value() if proxy.password is not None else None
        return cls(proxy.host, proxy.port, proxy.username, password, proxy.scheme)

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port``) for messages; "direct" for direct://."""
        if self.scheme == "direct":
            return "direct"
        return format_host_port(self.host, self.port)


def format_host_port(host: str | IPv4Address | IPv6Address, port: int) -> str:
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


# --- the driver ----------------------------------------------------------------------------------


async def connect(
    proxy: ProxyEndpoint,
    dst_host: str | IPv4Address | IPv6Address,
    dst_port: int,
    *,
    timeout: float,
    pipeline: bool = True,
    prepare_socket: SocketHook | None = None,
    fast_open: bool = False,
    on_round_trip: RoundTripObserver | None = None,
) -> tuple[socket.socket, tuple[str, int]]:
    """A socket connected through ``proxy`` to ``dst_host:dst_port``, and the proxy's bound address.

    The socket is non-blocking with TCP_NODELAY, ready for
    ``loop.create_connection(factory, sock=sock)``; nothing after the CONNECT reply has been read
    from it. ``dst_host`` may be an IP (object or literal) or a domain name the proxy resolves.
    ``timeout`` bounds resolving, connecting and the handshake together. ``pipeline=False``
    waits for each reply before sending the next message, for servers that cannot take them
    together. ``prepare_socket`` runs on the new socket before it connects (e.g. ``SO_MARK`` or
    ``SO_BINDTODEVICE`` so that the proxy connection stays out of the TUN). ``fast_open`` asks
    for TCP Fast Open (RFC 7413): the first write (the greeting) rides in the SYN when the
    kernel holds a cookie for the proxy; silently a plain connect where the kernel cannot.
    ``on_round_trip`` is told the login's round trip (the session pool's distance rule).

    Raises a ``Socks5Error`` subclass on failure; ``ValueError`` for an unusable destination
    (a port out of range, a name longer than 255 bytes).
    """
    return await request(
        proxy,
        Command.CONNECT,
        dst_host,
        dst_port,
        timeout=timeout,
        pipeline=pipeline,
        prepare_socket=prepare_socket,
        fast_open=fast_open,
        on_round_trip=on_round_trip,
    )


async def request(
    proxy: ProxyEndpoint,
    command: Command,
    dst_host: str | IPv4Address | IPv6Address,
    dst_port: int,
    *,
    timeout: float,
    pipeline: bool = True,
    prepare_socket: SocketHook | None = None,
    address_from_socket: Callable[[socket.socket], tuple[str, int]] | None = None,
    fast_open: bool = False,
    on_round_trip: RoundTripObserver | None = None,
) -> tuple[socket.socket, tuple[str, int]]:
    """The driver behind ``connect`` and UDP ASSOCIATE: the control socket and the bound address.

    ``address_from_socket``, when given, is called with the control socket once it is connected
    and returns the DST.ADDR/DST.PORT to send instead of ``dst_host:dst_port``: UDP ASSOCIATE
    names the client's own UDP endpoint, which depends on the local address of that socket.
    """
    command_name = command.name.replace("_", " ")
    request_bytes = build_request(command, dst_host, dst_port)
    attempt = _Attempt(
        proxy, command_name, format_host_port(dst_host, dst_port), on_round_trip=on_round_trip
    )

    async def steps() -> tuple[str, int]:
        nonlocal request_bytes
        await attempt.connect_to_proxy(prepare_socket, fast_open=fast_open)
        if address_from_socket is not None:
            assert attempt.sock is not None
            host, port = address_from_socket(attempt.sock)
            request_bytes = build_request(command, host, port)
            attempt.target = format_host_port(host, port)
        return await attempt.negotiate(request_bytes, pipeline=pipeline)

    bound = await _bounded(attempt, timeout, steps)
    assert attempt.sock is not None
    return attempt.sock, bound


# --- sessions: login now, request later (outbound/session_pool.py) -------------------------------


class Socks5SessionLost(Socks5ProtocolError):
    """A logged-in session was gone when its request was sent: the proxy closed or reset it
    before any byte of the reply (an idle timeout, a restart). A fresh connection may work."""


async def open_session(
    proxy: ProxyEndpoint,
    *,
    timeout: float,
    pipeline: bool,
    prepare_socket: SocketHook | None = None,
    fast_open: bool = False,
    on_round_trip: RoundTripObserver | None = None,
) -> socket.socket:
    """A socket to ``proxy`` on which the greeting and authentication are done (RFC 1928
    section 3, RFC 1929), ready for one request by ``connect_on_session``. With ``pipeline``
    the greeting and authentication go in one write."""
    attempt = _Attempt(proxy, "login", proxy.address, on_round_trip=on_round_trip)

    async def steps() -> None:
        await attempt.connect_to_proxy(prepare_socket, fast_open=fast_open)
        await attempt.login(pipeline=pipeline)

    await _bounded(attempt, timeout, steps)
    assert attempt.sock is not None
    return attempt.sock


async def connect_on_session(
    sock: socket.socket,
    proxy: ProxyEndpoint,
    dst_host: str | IPv4Address | IPv6Address,
    dst_port: int,
    *,
    timeout: float,
) -> tuple[str, int]:
    """CONNECT (RFC 1928 section 4) on a session from ``open_session``: one round trip. The
    proxy's bound address; on failure the socket is closed and a ``Socks5Error`` raised,
    ``Socks5SessionLost`` when the session turned out to be dead."""
    try:
        request_bytes = build_request(Command.CONNECT, dst_host, dst_port)
    except ValueError:
        sock.close()
        raise
    attempt = _Attempt(proxy, "CONNECT", format_host_port(dst_host, dst_port), sock)

    async def steps() -> tuple[str, int]:
        return await attempt.send_request(request_bytes)

    try:
        return await _bounded(attempt, timeout, steps)
    except Socks5ProtocolError as exc:
        if attempt.received or isinstance(exc, Socks5SessionLost):
            raise
        raise attempt.error(Socks5SessionLost, exc.reason) from None


async def _bounded(attempt: _Attempt, timeout: float, steps: Callable[[], Awaitable[T]]) -> T:
    """``steps()`` within ``timeout``; the attempt's socket is closed if they fail."""
    try:
        async with asyncio.timeout(timeout):
            return await steps()
    except TimeoutError:
        attempt.close()
        raise attempt.error(
            Socks5Timeout, f"timed out after {timeout:g} s {attempt.phase}"
        ) from None
    except BaseException:
        attempt.close()
        raise


class _Attempt:
    """One request in progress: its socket, what it is waiting for, how to word its errors."""

    def __init__(
        self,
        proxy: ProxyEndpoint,
        command: str,
        target: str,
        sock: socket.socket | None = None,
        *,
        on_round_trip: RoundTripObserver | None = None,
    ) -> None:
        self.proxy = proxy
        self.on_round_trip = on_round_trip
        self.command = command
        self.target = target
        self.sock = sock
        self.received = 0  # bytes read from the proxy so far
        self.phase = "resolving the proxy host"
        self.loop = asyncio.get_running_loop()

    def error(
        self, cls: type[Socks5Error], reason: str, reply_code: int | None = None
    ) -> Socks5Error:
        return cls(reason, self.proxy.address, self.target, self.command, reply_code)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    async def connect_to_proxy(
        self, prepare_socket: SocketHook | None, *, fast_open: bool = False
    ) -> None:
        last_error: OSError | None = None
        for family, sockaddr in await self._proxy_addresses():
            self.phase = "connecting to the proxy"
            sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock = sock
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if fast_open:  # a kernel without it (or with it off) connects as usual
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
                if prepare_socket is not None:
                    prepare_socket(sock)
                await self.loop.sock_connect(sock, sockaddr)
                return
            except OSError as exc:
                sock.close()
                self.sock = None
                last_error = exc
        reason = _os_reason(last_error) if last_error is not None else "no address"
        raise self.error(Socks5ProxyUnreachable, f"cannot reach proxy: {reason}")

    async def _proxy_addresses(self) -> list[tuple[int, tuple[str, int]]]:
        host, port = self.proxy.host, self.proxy.port
        try:
            ip = ip_address(host)
        except ValueError:
            pass
        else:  # a literal needs no resolver (which would cost a thread-pool round trip)
            return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))]
        try:
            infos = await self.loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except OSError as exc:
            reason = f"cannot resolve proxy host: {_os_reason(exc)}"
            raise self.error(Socks5ProxyUnreachable, reason) from None
        return [(family, (str(addr[0]), int(addr[1]))) for family, _, _, _, addr in infos]

    async def negotiate(self, request: bytes, *, pipeline: bool) -> tuple[str, int]:
        """Greeting, authentication, ``request`` and its reply; pipelined: one write."""
        await self.login(pipeline=pipeline, request=request if pipeline else b"")
        return await self.send_request(b"" if pipeline else request)

    async def login(self, *, pipeline: bool, request: bytes = b"") -> None:
        """Greeting and authentication. With ``pipeline`` both go in one write, followed by
        ``request`` (whose reply ``send_request(b"")`` then reads)."""
        username, password = self.proxy.username, self.proxy.password
        auth = (
            build_auth(username, password)
            if username is not None and password is not None
            else None
        )
        method = AuthMethod.USERNAME_PASSWORD if auth else AuthMethod.NO_AUTHENTICATION
        # One method offered: the only valid answer is known before it arrives, which is what
        # makes sending everything at once safe (RFC 1928 section 3).
        greeting = build_greeting([method])
        sent_at = self.loop.time()
        try:
            if pipeline:
                await self._send(greeting + (auth or b"") + request)
            else:
                await self._send(greeting)
            self.phase = "waiting for the method selection"
            chosen = parse_method_selection(await self._recv_exactly(METHOD_SELECTION_SIZE))
            if self.on_round_trip is not None:
                self.on_round_trip(self.loop.time() - sent_at)
            if chosen == AuthMethod.NO_ACCEPTABLE_METHODS:
                offered = "username/password" if auth else "no authentication"
                reason = f"proxy accepts none of the offered methods ({offered})"
                raise self.error(Socks5AuthFailed, reason)
            if chosen != method:
                reason = f"proxy chose authentication method {chosen:#04x}, which was not offered"
                raise self.error(Socks5ProtocolError, reason)
            if auth:
                if not pipeline:
                    await self._send(auth)
                self.phase = "waiting for the authentication reply"
                status = parse_auth_reply(await self._recv_exactly(AUTH_REPLY_SIZE))
                if status != 0:
                    reason = f"username/password rejected (status {status})"
                    raise self.error(Socks5AuthFailed, reason)
        except Socks5WireError as exc:
            raise self.error(Socks5ProtocolError, f"{exc} while {self.phase}") from None

    async def send_request(self, request: bytes) -> tuple[str, int]:
        """Send ``request`` (empty: it went out with the login) and read its reply."""
        try:
            if request:
                await self._send(request)
            self.phase = f"waiting for the {self.command} reply"
            return await self._recv_reply()
        except Socks5WireError as exc:
            raise self.error(Socks5ProtocolError, f"{exc} while {self.phase}") from None

    async def _send(self, data: bytes) -> None:
        assert self.sock is not None
        try:
            await self.loop.sock_sendall(self.sock, data)
        except OSError as exc:
            reason = f"send failed while {self.phase}: {_os_reason(exc)}"
            raise self.error(Socks5ProtocolError, reason) from None

    async def _recv_some(self, buf: bytearray, size: int, *, request_reply: bool = False) -> None:
        assert self.sock is not None
        try:
            chunk = await self.loop.sock_recv(self.sock, size)
        except OSError as exc:
            reason = f"{_os_reason(exc)} while {self.phase}"
            raise self.error(Socks5ProtocolError, reason) from None
        self.received += len(chunk)
        if not chunk:
            # Some servers send only VER REP before closing on failure: report that REP.
            if request_reply and len(buf) >= 2 and buf[0] == SOCKS_VERSION and buf[1] != 0:
                raise self.error(Socks5ReplyError, describe_reply(buf[1]), buf[1])
            reason = f"proxy closed the connection while {self.phase}"
            raise self.error(Socks5ProtocolError, reason)
        buf += chunk

    async def _recv_exactly(self, size: int) -> bytearray:
        buf = bytearray()
        while len(buf) < size:
            await self._recv_some(buf, size - len(buf))
        return buf

    async def _recv_reply(self) -> tuple[str, int]:
        buf = bytearray()
        while (missing := reply_bytes_missing(buf)) > 0:
            await self._recv_some(buf, missing, request_reply=True)
        reply = parse_reply(buf)
        assert reply is not None  # reply_bytes_missing() returned 0
        if reply.reply_code != ReplyCode.SUCCEEDED:
            code = reply.reply_code
            raise self.error(Socks5ReplyError, describe_reply(code), code)
        return reply.bound_host, reply.bound_port


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):  # its errno is an EAI_* code, not an errno
        return exc.strerror or str(exc)
    # asyncio's own messages ("Connect call failed ('1.2.3.4', 1)") repeat what we already say.
    return os.strerror(exc.errno) if exc.errno else (str(exc) or type(exc).__name__)


__all__ = [
    "ProxyEndpoint",
    "ProxySettings",
    "Socks5AuthFailed",
    "Socks5Error",
    "Socks5ProtocolError",
    "Socks5ProxyUnreachable",
    "Socks5ReplyError",
    "Socks5SessionLost",
    "Socks5Timeout",
    "connect",
    "connect_on_session",
    "format_host_port",
    "open_session",
    "request",
]
