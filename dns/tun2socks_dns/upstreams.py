"""How the forwarder reaches upstream resolvers: DNS over TCP and over UDP (asyncio).

Every upstream has ``label`` (for logs), ``async query(request) -> bytes`` and ``async close()``.
``request`` is a whole DNS message; an upstream may change its ID on the wire (pipelined TCP
needs IDs unique per connection, UDP wants unpredictable ones) and returns the raw answer,
which the forwarder checks against the question, not the ID. A failure raises (``OSError``,
``Socks5Error``, ``UpstreamError``); timeouts are the caller's (it cancels).

- ``TcpUpstream``: RFC 7766. One connection, opened on demand by a ``connect`` callable (through
  the SOCKS5 proxy, or a plain socket), kept while queries flow and closed after
  ``idle_timeout``; queries are pipelined on it and matched to answers by ID, so answers may
  come back in any order. A server may close a connection whenever it likes (RFC 7766 section
  6.2.3; dnsmasq does after 100 queries): from its EOF or reset on, nothing more is written to
  that connection, and the queries it left unanswered are sent again on one new connection
  (counted: ``TcpCounters``), as long as the closed one had answered something (a server that
  answers nothing at all is a failure, not a reason to loop). A server that closed with queries
  unanswered after answering N has shown its limit: from then on a connection gets at most N
  queries, and the next ones go to a new connection opened meanwhile, so that queries are not
  written into a connection that will drop them.
- ``UdpUpstream``: a query over UDP by an ``exchange`` callable (a fresh plain socket per query
  for ``direct://``: a random source port and ID resist spoofing; a SOCKS5 UDP association for
  ``udp://``, see ``socks_udp.py``); an answer with TC set is asked again over TCP (RFC 7766
  section 5), counted in ``tcp_retries``.
- ``DestinationUpstreams``: with no upstream configured, a query goes to the address it was
  sent to, over TCP through the proxy: one ``TcpUpstream`` per such address (a few, LRU).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from .single_flight import SingleFlight

log = logging.getLogger("tun2socks.dns")

IPAddress = IPv4Address | IPv6Address
Connect = Callable[[], Awaitable[socket.socket]]
Exchange = Callable[[bytes], Awaitable[bytes]]

TCP_IDLE_TIMEOUT = 30.0  # seconds an idle upstream connection is kept (RFC 7766 section 6.2.3)
MAX_UDP_ANSWER = 65535
MAX_DESTINATIONS = 16
# How many connections one query may try when servers close them under it (each of which had
# answered others, or was closing before the query was sent); the caller's timeout bounds it too.
MAX_RESENDS = 8
RETIRE_GRACE = 1.0  # seconds a connection that got its last query waits for the server's close
REOPEN_GRACE = 5.0  # seconds a connection left by reopen() may still deliver answers


class UpstreamError(Exception):
    """An upstream answered something unusable (HTTP error, garbage, closed mid-answer)."""


class Upstream(Protocol):
    label: str

    async def query(self, request: bytes) -> bytes: ...

    def reopen(self) -> None:
        """The path out of the host changed (tun2socks.path_watch): new queries go over new
        connections; what is open takes no more queries and closes after a grace period."""
        ...

    async def close(self) -> None: ...


@dataclass
class TcpCounters:
    """What happened to an upstream's TCP connections (``DnsForwarder.stats``)."""

    server_closes: int = 0  # connections the server ended (EOF or reset) while we used them
    reconnects: int = 0  # connections opened to replace one the server ended or would end

    def add(self, other: TcpCounters) -> None:
        self.server_closes += other.server_closes
        self.reconnects += other.reconnects


class StreamClosed(ConnectionResetError):
    """The query was not sent: the connection was already closed or closing."""


class _DnsStream(asyncio.Protocol):
    """One TCP connection to an upstream: length-prefixed messages, answers matched by ID.

    ``on_close`` is called once when it closes: ``closed_by_server`` tells whether the server
    ended it (EOF, reset, or a write failing) or we did (idle, retired, shutdown).
    """

    def __init__(self, idle_timeout: float, on_close: Callable[[_DnsStream], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.closed_by_server = False
        self.sent = 0
        self.answered = 0
        self.retired = False  # gets no more queries: closed once they are answered
        self.replaced = False  # a newer connection took over
        self._on_close = on_close
        self._buffer = bytearray()
        self._waiters: dict[int, asyncio.Future[bytes]] = {}
        self._idle_timeout = idle_timeout
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 2:
            size = int.from_bytes(buffer[:2], "big")
            if len(buffer) < 2 + size:
                break
            message = bytes(buffer[2 : 2 + size])
            del buffer[: 2 + size]
            if len(message) < 2:
                continue
            waiter = self._waiters.pop(int.from_bytes(message[:2], "big"), None)
            if waiter is not None and not waiter.done():
                self.answered += 1
                waiter.set_result(message)
        if not self._waiters:
            self._arm_idle_timer()

    def eof_received(self) -> bool:
        self._server_closed()
        return False  # the server is done with us: close

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._waiters and self.transport is not None:
            self._salvage(self.transport)
        self._server_closed()  # unless we closed it first
        self.transport = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        reason = f"connection closed: {exc}" if exc else "connection closed by the server"
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionResetError(reason))
        self._waiters.clear()

    def _salvage(self, transport: asyncio.Transport) -> None:
        """Read the answers that arrived before the connection failed.

        A server at its limit answers, then closes with our next queries unread, and the reset
        that follows makes our next write fail; asyncio then drops the connection without
        reading what the kernel still holds for us (the socket is closed after this call)."""
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        fd = sock.fileno()
        for _ in range(64):  # bounded: at most 4 MiB
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return
            self.data_received(data)

    def usable(self) -> bool:
        """Whether queries may be written here. A write that failed (the server reset the
        connection) closes the transport before ``connection_lost`` tells us: that is the
        server's close too."""
        if not self.closed and (self.transport is None or self.transport.is_closing()):
            self._server_closed()
        return not self.closed

    def _server_closed(self) -> None:
        if not self.closed:
            self.closed = self.closed_by_server = True  # from now on nothing is written here
            self._on_close(self)

    def retire(self) -> None:
        """No more queries here; close after the last answer, if the server does not first."""
        if not self.retired:
            self.retired = True
            if not self._waiters and not self.closed:
                self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        timeout = RETIRE_GRACE if self.retired else self._idle_timeout
        self._idle_timer = self.loop.call_later(timeout, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not self._waiters:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self._on_close(self)

    async def exchange(self, request: bytes) -> bytes:
        # A closing transport drops what is written to it (and asyncio logs "socket.send()
        # raised exception" for each write after a few): never write there.
        if not self.usable() or self.transport is None:
            raise StreamClosed("connection closed")
        message_id = _unused_id(self._waiters)
        waiter: asyncio.Future[bytes] = self.loop.create_future()
        self._waiters[message_id] = waiter
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        wire = message_id.to_bytes(2, "big") + request[2:]
        self.transport.write(len(wire).to_bytes(2, "big") + wire)
        self.sent += 1
        try:
            return await waiter
        finally:
            if self._waiters.get(message_id) is waiter:
                del self._waiters[message_id]
            if not self._waiters and not self.closed:
                self._arm_idle_timer()


def _unused_id(taken: dict[int, asyncio.Future[bytes]]) -> int:
    while True:
        candidate = secrets.randbelow(0x10000)
        if candidate not in taken:
            return candidate


class TcpUpstream:
    def __init__(
        self, label: str, connect: Connect, *, idle_timeout: float = TCP_IDLE_TIMEOUT
    ) -> None:
        self.label = label
        self.counters = TcpCounters()
        self._connect = connect
        self._idle_timeout = idle_timeout
        self._stream: _DnsStream | None = None
        self._opening = SingleFlight(self._open)
        self._per_connection: int | None = None  # the server's limit, once it showed one
        self._below_limit = 0  # the most queries a connection carried that the server kept open
        self._reconnect_due = False  # the server closed the current connection

    async def query(self, request: bytes) -> bytes:
        tries = 0
        while True:
            stream = await self._current()
            try:
                return await stream.exchange(request)
            except ConnectionResetError:
                # The server closed without answering it. Send it again on a new connection
                # if this one served others (the server's own limit, RFC 7766 section 6.2.3);
                # if it served nothing, the server is not answering.
                tries += 1
                if stream.answered == 0 or tries > MAX_RESENDS:
                    raise

    def _full(self, stream: _DnsStream) -> bool:
        return self._per_connection is not None and stream.sent >= self._per_connection

    async def _current(self) -> _DnsStream:
        """A connection that takes one more query: the current one, or a new one."""
        closed_at_once = 0
        while True:
            stream = self._stream
            if stream is not None and stream.usable():
                if not self._full(stream):
                    return stream
                stream.retire()
            fresh = await self._opening.get()  # one opening, however many queries wait
            if not fresh.usable():
                closed_at_once += 1
                if closed_at_once > MAX_RESENDS:
                    raise ConnectionResetError("the server closes every new connection")

    async def _open(self) -> _DnsStream:
        sock = await self._connect()
        loop = asyncio.get_running_loop()
        try:
            _, stream = await loop.create_connection(
                lambda: _DnsStream(self._idle_timeout, self._stream_closed), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        if self._stream is not None:
            self._stream.replaced = True
        if self._reconnect_due:
            self._reconnect_due = False
            self.counters.reconnects += 1
        self._stream = stream
        return stream

    def _stream_closed(self, stream: _DnsStream) -> None:
        limit = self._per_connection
        if stream.closed_by_server:
            self.counters.server_closes += 1
            if stream.replaced:  # its successor was opened when it reached the limit
                self.counters.reconnects += 1
            else:
                self._reconnect_due = True  # the next opening replaces it
            if 0 < stream.answered < stream.sent:
                # It closed with queries unanswered: its limit per connection (or less, if
                # the proxy dropped answers when the server reset the connection).
                self._per_connection = max(stream.answered, self._below_limit + 1)
            log.debug(
                "dns upstream %s: the server closed the connection after %d answers",
                self.label,
                stream.answered,
            )
        elif stream.retired and limit is not None:
            # It got its last query and all answers, and the server did not close it: the
            # server's limit is higher than we thought.
            self._below_limit = max(self._below_limit, stream.sent)
            self._per_connection = limit + max(1, limit // 4)

    def reopen(self) -> None:
        """The next query opens a new connection (by the path the host has now); the current
        one answers what it carries and closes (see _DnsStream.retire)."""
        stream, self._stream = self._stream, None
        if stream is not None and not stream.closed:
            stream.replaced = True
            stream.retire()

    async def close(self) -> None:
        await self._opening.cancel()
        if self._stream is not None:
            self._stream.close()


class UdpUnsupported(Exception):
    """The way to send UDP is not available (the proxy refused UDP ASSOCIATE)."""


class UdpUpstream:
    """DNS over UDP by ``exchange``, and over ``tcp`` when the answer is truncated.

    When ``exchange`` raises ``UdpUnsupported`` every query goes over TCP from then on.
    """

    def __init__(
        self,
        label: str,
        exchange: Exchange,
        tcp: TcpUpstream,
        *,
        close_exchange: Callable[[], Awaitable[None]] | None = None,
        reopen_exchange: Callable[[], None] | None = None,
    ) -> None:
        self.label = label
        self._exchange = exchange
        self._close_exchange = close_exchange
        self._reopen_exchange = reopen_exchange
        self._tcp = tcp
        self.tcp_retries = 0
        self.udp_unsupported = False

    async def query(self, request: bytes) -> bytes:
        if not self.udp_unsupported:
            try:
                answer = await self._exchange(request)
            except UdpUnsupported as exc:
                self.udp_unsupported = True
                log.warning("dns upstream %s: %s; using TCP instead", self.label, exc)
            else:
                if not answer[2] & 0x02:
                    return answer
                self.tcp_retries += 1  # TC: the answer did not fit in a datagram
        return await self._tcp.query(request)

    @property
    def tcp(self) -> TcpUpstream:
        return self._tcp

    def reopen(self) -> None:
        if self._reopen_exchange is not None:
            self._reopen_exchange()
        self._tcp.reopen()

    async def close(self) -> None:
        if self._close_exchange is not None:
            await self._close_exchange()
        await self._tcp.close()


def plain_udp_exchange(
    address: IPAddress, port: int, prepare_socket: Callable[[socket.socket], None] | None
) -> Exchange:
    """An ``Exchange`` on a fresh plain UDP socket per query, for ``direct://``."""

    async def exchange(request: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        sock = _plain_socket(address, socket.SOCK_DGRAM, prepare_socket)
        try:
            await loop.sock_connect(sock, (str(address), port))
            message_id = secrets.randbelow(0x10000).to_bytes(2, "big")
            await loop.sock_sendall(sock, message_id + request[2:])
            while True:  # ends with an answer, or when the caller cancels (its timeout)
                data = await loop.sock_recv(sock, MAX_UDP_ANSWER)
                # Anything else is late, stray or spoofed: ignore it and keep waiting.
                if len(data) >= 12 and data[:2] == message_id and data[2] & 0x80:
                    return data
        finally:
            sock.close()

    return exchange


class DestinationUpstreams:
    """A ``TcpUpstream`` per resolver address the clients write to (bounded, LRU)."""

    def __init__(self, make: Callable[[IPAddress], TcpUpstream], size: int = MAX_DESTINATIONS):
        self._make = make
        self._size = size
        self._upstreams: OrderedDict[IPAddress, TcpUpstream] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()
        self._evicted_counters = TcpCounters()  # of the upstreams no longer kept

    def for_destination(self, address: IPAddress) -> TcpUpstream:
        upstream = self._upstreams.get(address)
        if upstream is None:
            upstream = self._upstreams[address] = self._make(address)
            while len(self._upstreams) > self._size:
                _, evicted = self._upstreams.popitem(last=False)
                self._evicted_counters.add(evicted.counters)
                task = asyncio.get_running_loop().create_task(evicted.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        self._upstreams.move_to_end(address)
        return upstream

    def counters(self) -> TcpCounters:
        total = TcpCounters()
        total.add(self._evicted_counters)
        for upstream in self._upstreams.values():
            total.add(upstream.counters)
        return total

    def reopen(self) -> None:
        for upstream in self._upstreams.values():
            upstream.reopen()

    async def close(self) -> None:
        for upstream in self._upstreams.values():
            await upstream.close()
        self._upstreams.clear()


def plain_tcp_connect(
    address: IPAddress, port: int, prepare_socket: Callable[[socket.socket], None] | None
) -> Connect:
    """A ``Connect`` for a plain (not proxied) TCP socket, for ``direct://``."""

    async def connect() -> socket.socket:
        sock = _plain_socket(address, socket.SOCK_STREAM, prepare_socket)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def _plain_socket(
    address: IPAddress, kind: int, prepare_socket: Callable[[socket.socket], None] | None
) -> socket.socket:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        if prepare_socket is not None:
            prepare_socket(sock)
    except BaseException:
        sock.close()
        raise
    return sock
