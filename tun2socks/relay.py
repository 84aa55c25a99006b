"""One TCP flow of the stack joined to one upstream connection, with backpressure both ways.

Client -> upstream: the stack buffers what the client sends; the relay takes it only
while the upstream transport accepts writes (below its high-water mark).  When the
upstream is slow, the stack's buffer fills and its advertised window closes.

Upstream -> client: what the upstream sends is queued in the stack; when the stack's send
buffer is full (the client reads slowly, its window is closed), the relay pauses reading
the upstream socket until the stack reports `SendSpaceAvailable`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol, cast

from tun2socks.net.stack import Stack

if TYPE_CHECKING:
    from tun2socks.net.events import FlowRequested

log = logging.getLogger("tun2socks.relay")

# The upstream transport's write buffer: small, the stack's receive buffer is the real one.
UPSTREAM_WRITE_HIGH_WATER = 64 * 1024


class Engine(Protocol):
    """What a relay needs from the program that owns the stack."""

    stack: Stack

    def schedule_flush(self) -> None: ...

    def flush(self) -> None: ...

    def relay_finished(self, relay: Relay) -> None: ...


class Relay(asyncio.Protocol):
    """The upstream side of one flow (an asyncio Protocol) and the glue to the stack."""

    # One per open flow: slots keep thousands of idle flows cheap.
    __slots__ = (
        "_eof_sent",
        "_finished",
        "_upstream_gone",
        "_upstream_paused",
        "bytes_down",
        "bytes_up",
        "connect_task",
        "engine",
        "flow",
        "flow_id",
        "route_label",
        "transport",
    )

    def __init__(self, engine: Engine, flow: FlowRequested) -> None:
        self.engine = engine
        self.flow = flow
        self.flow_id = flow.flow_id
        self.transport: asyncio.Transport | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self._upstream_paused = False  # the upstream socket's send buffer is full
        self._eof_sent = False
        self._upstream_gone = False  # the upstream closed its socket entirely
        self._finished = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.route_label = "proxy"  # how the flow leaves: set by the dialer that opened it

    def describe(self) -> str:
        f = self.flow
        src = f"[{f.src}]:{f.src_port}" if f.src.version == 6 else f"{f.src}:{f.src_port}"
        dst = f"[{f.dst}]:{f.dst_port}" if f.dst.version == 6 else f"{f.dst}:{f.dst_port}"
        return f"flow {self.flow_id} {src} -> {dst}"

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=UPSTREAM_WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.bytes_down += len(data)
        space = self.engine.stack.send(self.flow_id, data)
        if space <= 0 and self.transport is not None:
            self.transport.pause_reading()
        # At once, not at the end of the loop iteration: the answer is on the client's
        # critical path, and asyncio reads one socket per callback anyway.
        self.engine.flush()

    def eof_received(self) -> bool:
        # The upstream half-closed: FIN to the client after the queued data (at once: a
        # client reading to the end of the stream waits for it).
        self.engine.stack.shutdown(self.flow_id)
        self.engine.flush()
        return True  # keep our sending half open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._finished:
            return
        if exc is not None:
            log.info("%s: upstream connection lost: %s", self.describe(), exc)
            self.engine.stack.abort(self.flow_id)
            self._finish()
        else:
            self._upstream_gone = True
            self.engine.stack.shutdown(self.flow_id)
        self.engine.schedule_flush()

    def pause_writing(self) -> None:
        self._upstream_paused = True

    def resume_writing(self) -> None:
        self._upstream_paused = False
        self.pump_to_upstream()

    # ---------------------------------------------------------------- stack events

    def pump_to_upstream(self) -> None:
        """Move what the client sent to the upstream while it accepts writes."""
        transport = self.transport
        stack = self.engine.stack
        if self._upstream_gone:
            if stack.buffered(self.flow_id):
                # The client sends to an upstream that no longer exists: it must learn it.
                self.abort()
            return
        if transport is None or self._upstream_paused or transport.is_closing():
            return
        data = stack.receive(self.flow_id)
        if data:
            self.bytes_up += len(data)
            transport.write(data)
            self.engine.schedule_flush()  # the receive window opened
        if not self._eof_sent and not self._upstream_paused and stack.at_eof(self.flow_id):
            self._eof_sent = True
            if transport.can_write_eof():
                try:
                    transport.write_eof()  # half-close maps to shutdown(SHUT_WR)
                except OSError as exc:  # the upstream died right after connecting (ENOTCONN)
                    log.info("%s: upstream gone at half-close: %s", self.describe(), exc)
                    self.abort()

    def send_space_available(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def flow_ended(self) -> None:
        """Both directions are closed: release the upstream."""
        if self.transport is not None:
            self.transport.close()
        self._finish()

    def flow_reset(self, reason: str) -> None:
        log.info("%s: reset (%s)", self.describe(), reason)
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.transport is not None:
            self.transport.abort()
        self._finish()

    def abort(self) -> None:
        """Reset the client side and drop the upstream (shutdown, API close)."""
        self.engine.stack.abort(self.flow_id)
        self.flow_reset("aborted")

    @property
    def finished(self) -> bool:
        """The flow is over (ended, reset or refused): the engine no longer holds it."""
        return self._finished

    def forget_transport(self) -> None:
        """The upstream was a dead session (pending_connect.py) on which none of the client's
        data went: the flow is dialed again, and the next transport starts afresh."""
        self.transport = None
        self._upstream_paused = False
        self._eof_sent = False

    def close_transport(self) -> None:
        """Drop an upstream transport made after the flow was over."""
        if self.transport is not None:
            self.transport.abort()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.engine.relay_finished(self)
