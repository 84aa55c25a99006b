"""``udp://`` upstreams: DNS over UDP through one SOCKS5 UDP ASSOCIATE (asyncio).

One association per upstream, opened on the first query and reused: queries go out with a
random ID unused among those in flight and the letters of their name in random case (0x20,
``case_0x20.py``: the association's port never changes, so the ID alone would be 16 bits
against spoofing); answers come back through ``on_datagram`` and are matched by ID, by their
source (the upstream's address and port) and by the exact spelling of their question: any
other datagram is ignored, counted in ``rejected``, and the query keeps waiting.
When the association ends (the proxy closed its control connection), queries in flight fail
and the next query opens a new one; after ``idle_timeout`` without queries it is closed.

A proxy without UDP ASSOCIATE (reply 7, "command not supported") makes ``exchange`` raise
``UdpUnsupported``, and ``UdpUpstream`` switches that upstream to TCP through the proxy.
The association client itself is ``tun2socks.outbound.socks5_udp``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

from tun2socks.outbound.socks5 import Socks5ReplyError
from tun2socks.outbound.socks5_udp import UdpAssociation

from .case_0x20 import randomize_case, same_question
from .single_flight import SingleFlight
from .upstreams import REOPEN_GRACE, UdpUnsupported

IPAddress = IPv4Address | IPv6Address
OnDatagram = Callable[[str, int, bytes], None]
OnClose = Callable[[str], None]
Associate = Callable[[OnDatagram, OnClose], Awaitable[UdpAssociation]]

COMMAND_NOT_SUPPORTED = 7  # RFC 1928 section 6


class SocksUdpExchange:
    def __init__(
        self,
        server: IPAddress,
        port: int,
        associate: Associate,
        *,
        idle_timeout: float = 60.0,
        random_bits: Callable[[int], int] = secrets.randbits,
    ) -> None:
        self._random_bits = random_bits
        self.server = server
        self.port = port
        self._associate = associate
        self._idle_timeout = idle_timeout
        self._association: UdpAssociation | None = None
        self._opening = SingleFlight(self._open)
        self._waiters: dict[int, tuple[asyncio.Future[bytes], bytes]] = {}
        self._idle_timer: asyncio.TimerHandle | None = None
        self.rejected = 0  # answers with a known ID but the wrong source or spelling

    async def __call__(self, request: bytes) -> bytes:
        association = await self._current()
        loop = asyncio.get_running_loop()
        while True:
            message_id = secrets.randbelow(0x10000)
            if message_id not in self._waiters:
                break
        waiter: asyncio.Future[bytes] = loop.create_future()
        wire = randomize_case(message_id.to_bytes(2, "big") + request[2:], self._random_bits)
        self._waiters[message_id] = (waiter, wire)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        try:
            if not association.send(str(self.server), self.port, wire):
                raise ConnectionResetError("the UDP association dropped the query")
            return await waiter
        finally:
            if message_id in self._waiters and self._waiters[message_id][0] is waiter:
                del self._waiters[message_id]
            if not self._waiters:
                self._idle_timer = loop.call_later(self._idle_timeout, self._close_if_idle)

    async def _current(self) -> UdpAssociation:
        if self._association is not None and not self._association.closed:
            return self._association
        return await self._opening.get()

    async def _open(self) -> UdpAssociation:
        try:
            association = await self._associate(self._on_datagram, self._on_close)
        except Socks5ReplyError as exc:
            if exc.reply_code == COMMAND_NOT_SUPPORTED:
                raise UdpUnsupported("the proxy does not support UDP ASSOCIATE") from None
            raise
        self._association = association
        return association

    def _on_datagram(self, host: str, port: int, payload: bytes) -> None:
        try:
            source = ip_address(host)
        except ValueError:
            return
        if len(payload) < 12 or not payload[2] & 0x80:
            return
        message_id = int.from_bytes(payload[:2], "big")
        pending = self._waiters.get(message_id)
        if pending is None:
            return
        waiter, sent = pending
        if source != self.server or port != self.port or not same_question(sent, payload):
            self.rejected += 1  # spoofed or stale: keep waiting for the real answer
            return
        del self._waiters[message_id]
        if not waiter.done():
            waiter.set_result(payload)

    def _on_close(self, reason: str) -> None:
        self._association = None
        for waiter, _sent in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionResetError(f"UDP association ended: {reason}"))
        self._waiters.clear()

    def reopen(self) -> None:
        """The next query opens a new association (the path out changed). The old one still
        delivers answers to the queries it carries (same waiters), then closes."""
        old, self._association = self._association, None
        if old is not None:
            old.on_close = None  # its end no longer concerns the queries of the new one
            asyncio.get_running_loop().call_later(REOPEN_GRACE, old.close)

    def _close_if_idle(self) -> None:
        if not self._waiters and self._association is not None:
            self._association.close()
            self._association = None

    async def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        await self._opening.cancel()
        if self._association is not None:
            self._association.close()
            self._association = None
