"""The upstream of a flow whose CONNECT reply is still due, in front of its relay.

Theory of operation: an early-accepted flow (``proxy.early_accept``) that got a ready pooled
session of a proxy known to take pipelined messages has its CONNECT sent and its transport made
at once (``outbound/dialer.py``: ``PendingConnect``), so the client's first data goes to the
proxy right behind the request. ``ReplyWaiter`` is that transport's protocol until the reply
is in: the relay writes the client's data through the same transport meanwhile, and the
waiter reads the stream head with the sans-IO ``ReplySplitter`` (exact sizes). On success it
hands the transport to the relay (``set_protocol``) with the bytes that came after the reply;
on a failure reply, garbage, an end of the stream or a timeout it tells the engine, which
resets the flow, or dials afresh when the session was dead and no client data was sent on it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol, cast

from tun2socks.outbound import socks5
from tun2socks.outbound.connect_reply import ReplyFailed, ReplySplitter

if TYPE_CHECKING:
    from tun2socks.outbound.dialer import PendingConnect
    from tun2socks.relay import Relay


class Engine(Protocol):
    """What the waiter tells the engine."""

    def reply_arrived(self, relay: Relay) -> None: ...

    def reply_failed(
        self, relay: Relay, pending: PendingConnect, error: socks5.Socks5Error
    ) -> None: ...


class ReplyWaiter(asyncio.Protocol):
    """The protocol of one pipelined flow's upstream until its CONNECT reply is in."""

    def __init__(
        self,
        engine: Engine,
        relay: Relay,
        pending: PendingConnect,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._engine = engine
        self._relay = relay
        self._pending = pending
        self._splitter = ReplySplitter()
        self._transport: asyncio.Transport | None = None
        self._done = False
        self._timer = loop.call_later(pending.timeout, self._timed_out)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._relay.connection_made(transport)  # the client's data may go out from now

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        outcome = self._splitter.feed(data)
        if outcome is None:
            return
        if isinstance(outcome, ReplyFailed):
            self._fail(outcome)
            return
        self._finish()
        relay = self._relay
        if relay.finished:  # the client gave up meanwhile
            relay.close_transport()
            return
        assert self._transport is not None
        self._transport.set_protocol(relay)
        self._engine.reply_arrived(relay)
        if outcome.rest:
            relay.data_received(outcome.rest)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost says what it means

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done:
            reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else None
            self._fail(self._splitter.ended(reason and reason.lower()))

    def pause_writing(self) -> None:
        self._relay.pause_writing()

    def resume_writing(self) -> None:
        self._relay.resume_writing()

    def _timed_out(self) -> None:
        if not self._done:
            reason = f"timed out after {self._pending.timeout:g} s waiting for the CONNECT reply"
            self._give_up(socks5.Socks5Timeout, reason)

    def _fail(self, outcome: ReplyFailed) -> None:
        cls: type[socks5.Socks5Error] = socks5.Socks5ProtocolError
        if outcome.reply_code is not None:
            cls = socks5.Socks5ReplyError
        elif outcome.before_any_byte:
            cls = socks5.Socks5SessionLost
        self._give_up(cls, outcome.reason, outcome.reply_code)

    def _give_up(
        self, cls: type[socks5.Socks5Error], reason: str, reply_code: int | None = None
    ) -> None:
        self._finish()
        if self._relay.finished:  # the client gave up meanwhile
            self._relay.close_transport()
            return
        pending = self._pending
        error = cls(reason, pending.proxy, pending.target, "CONNECT", reply_code)
        self._engine.reply_failed(self._relay, pending, error)

    def _finish(self) -> None:
        self._done = True
        self._timer.cancel()
