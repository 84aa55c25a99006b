"""How a TCP flow reaches its destination: the `Dialer` interface and the SOCKS5 dialer.

The engine asks a dialer for a connected socket for each new flow, and answers the
client's SYN with SYN-ACK if it gets one, or RST if the dialer raises.  Other ways out
(direct sockets, rules, DNS interception) are dialers too, wrapping this one.

The client's first data right behind the CONNECT (``proxy.early_accept``): the dial of a flow
the engine has already accepted carries a ``FirstDataOffer``. A ``Socks5Dialer`` that then
takes a ready pooled session of a proxy known to take pipelined messages sends the CONNECT and
returns the session at once, its reply still due, and says so in the offer
(``PendingConnect``); the engine reads the reply in front of the relay
(``tun2socks/pending_connect.py``). The dialers that wrap this one (loop guard, DNS,
rules, failover) pass the offer on; a direct connection has no reply to wait for and ignores it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from tun2socks.net.events import FlowRequested
from tun2socks.outbound import http_connect, socks5
from tun2socks.outbound.pipeline_probe import Pipelining
from tun2socks.outbound.session_pool import SessionPool
from tun2socks.outbound.socks5_wire import Command, build_request


class DialError(Exception):
    """A flow cannot be opened; its str is one log line (no secrets). ``kind``: the key under
    which the engine counts the refused flow, as ``Socks5Error.kind``."""

    kind = "dial_failed"


@dataclass(frozen=True, slots=True)
class PendingConnect:
    """A pooled session whose CONNECT went out and whose reply is still to come: ``proxy``
    and ``target`` name them in messages, the reply is due within ``timeout`` seconds, and
    ``session_lost()`` is called if the session turns out to have been dead (no reply byte)."""

    proxy: str
    target: str
    timeout: float
    session_lost: Callable[[], None]


class FirstDataOffer:
    """The engine's leave to answer one dial with a session whose reply is still due;
    ``pending`` is set by the dialer that does so."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: PendingConnect | None = None


class Dialer(Protocol):
    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        """A connected non-blocking socket for `flow`; raises DialError, Socks5Error or OSError.
        With an `offer`, the socket may be one whose CONNECT reply is still due (the module
        doc); the dialer then sets `offer.pending`."""
        ...


class HostDialer(Dialer, Protocol):
    async def dial_host(
        self,
        host: str | IPv4Address | IPv6Address,
        port: int,
        *,
        offer: FirstDataOffer | None = None,
    ) -> socket.socket:
        """A connected socket to `host` (an address, or a name the proxy resolves) and `port`;
        `offer` as for `dial`."""
        ...


class Socks5Dialer:
    """Every flow through one proxy, to the address the client connected to: SOCKS5, or an
    HTTP proxy by CONNECT when ``proxy.scheme`` is "http" (same errors, same protection).

    ``pipeline``: send the handshake in one write (True), never (False), or as a probe found
    out (``Pipelining`` with ``auto``). ``pool``: logged-in sessions to take a flow's CONNECT
    to (SOCKS5 only); a session found dead is dropped and the flow dialed afresh, unseen by
    the client. ``fast_open``: TCP Fast Open to the proxy on fresh connections.

    With a ``FirstDataOffer`` (the module doc), a pooled session of a proxy whose pipelining
    is known to work gets the CONNECT and is returned before its reply; one that fails to
    take the request is dropped and the flow dialed afresh. A fresh connection always does
    the whole handshake first.
    """

    def __init__(
        self,
        proxy: socks5.ProxyEndpoint,
        *,
        timeout: float,
        prepare_socket: Callable[[socket.socket], None] | None = None,
        pipeline: bool | Pipelining = True,
        pool: SessionPool | None = None,
        fast_open: bool = False,
    ) -> None:
        self.proxy = proxy
        self.timeout = timeout
        self.prepare_socket = prepare_socket
        self.pipeline = pipeline if isinstance(pipeline, Pipelining) else Pipelining(pipeline)
        self.pool = pool
        self.fast_open = fast_open

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        return await self.dial_host(flow.dst, flow.dst_port, offer=offer)

    async def dial_host(
        self,
        host: str | IPv4Address | IPv6Address,
        port: int,
        *,
        offer: FirstDataOffer | None = None,
    ) -> socket.socket:
        """A connection to `host` (an address, or a name the proxy resolves) and `port`."""
        if self.proxy.scheme == "http":
            return await http_connect.connect(
                self.proxy, host, port, timeout=self.timeout, prepare_socket=self.prepare_socket
            )
        if self.pool is None:
            return await self._fresh(host, port)
        try:
            session = self.pool.take()
            if session is not None:
                if offer is not None and offer.pending is None and self.pipeline.supported:
                    if self._send_connect(session, host, port, offer):
                        return session
                    self.pool.lost()  # it could not take the request: dial afresh
                    return await self._fresh(host, port)
                try:
                    await socks5.connect_on_session(
                        session, self.proxy, host, port, timeout=self.timeout
                    )
                except socks5.Socks5SessionLost:
                    self.pool.lost()  # an idle timeout or a restart of the proxy: dial afresh
                else:
                    return session
            return await self._fresh(host, port)
        finally:
            self.pool.refill()

    def _send_connect(
        self,
        session: socket.socket,
        host: str | IPv4Address | IPv6Address,
        port: int,
        offer: FirstDataOffer,
    ) -> bool:
        """The CONNECT (RFC 1928 section 4) on `session` in one non-blocking send, its reply
        left for the caller (`offer.pending`); False, the session closed, if it cannot go."""
        try:
            request = build_request(Command.CONNECT, host, port)
        except ValueError:
            session.close()
            raise
        try:
            sent = session.send(request)  # an idle session's send buffer is empty
        except OSError:
            sent = 0
        if sent != len(request):
            session.close()
            return False
        target = socks5.format_host_port(host, port)
        pool = self.pool
        assert pool is not None
        offer.pending = PendingConnect(self.proxy.address, target, self.timeout, pool.lost)
        return True

    async def _fresh(self, host: str | IPv4Address | IPv6Address, port: int) -> socket.socket:
        sock, _bound = await socks5.connect(
            self.proxy,
            host,
            port,
            timeout=self.timeout,
            pipeline=self.pipeline.use_now(),
            prepare_socket=self.prepare_socket,
            fast_open=self.fast_open,
            on_round_trip=self.pool.round_trip_seen if self.pool is not None else None,
        )
        return sock
