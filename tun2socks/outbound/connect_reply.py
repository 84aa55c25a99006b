"""The reply to a CONNECT whose client data was sent right behind it, split off the stream.

Theory of operation: with ``proxy.early_accept``, a flow to a known destination that gets a ready
pooled session of a proxy known to take pipelined messages does not wait for the CONNECT reply:
the client's first data follows the request on the same connection, and the proxy forwards it
once its own connect is done. The first bytes the proxy then sends are the reply (RFC 1928
section 6: VER REP RSV ATYP BND.ADDR BND.PORT), and whatever follows them in the same stream is
the destination's data, which belongs to the client. ``ReplySplitter`` takes the stream as it
arrives and says, as soon as it can, whether the reply succeeded and which bytes came after it,
or why it failed. Sans-IO: bytes in, an outcome out; the asyncio side is
``tun2socks/pending_connect.py``.

Sizes are exact (``socks5_wire.reply_bytes_missing``): no byte of the destination's data is taken
for part of the reply, and none of the reply is passed on.
"""

from __future__ import annotations

from dataclasses import dataclass

from tun2socks.outbound.socks5_wire import (
    SOCKS_VERSION,
    Buffer,
    ReplyCode,
    Socks5WireError,
    describe_reply,
    parse_reply,
    reply_bytes_missing,
)

WAITING = "waiting for the CONNECT reply"


@dataclass(frozen=True, slots=True)
class ReplySucceeded:
    """REP 0: the proxy is connected; ``rest`` is the destination's data that came with it."""

    bound_host: str
    bound_port: int
    rest: bytes


@dataclass(frozen=True, slots=True)
class ReplyFailed:
    """No connection: ``reply_code`` is the REP of a failure reply (None for garbage or an early
    end); ``before_any_byte`` says the stream ended before the reply's first byte (a session the
    proxy had closed or reset: a fresh connection may still work)."""

    reason: str
    reply_code: int | None = None
    before_any_byte: bool = False


ReplyOutcome = ReplySucceeded | ReplyFailed


class ReplySplitter:
    """The head of one proxy stream until its CONNECT reply is complete; used once."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def received(self) -> int:
        """Bytes of the reply seen so far."""
        return len(self._buffer)

    def feed(self, data: Buffer) -> ReplyOutcome | None:
        """Take the next bytes of the stream: None while the reply is incomplete, else the
        outcome (not to be fed again after that)."""
        buffer = self._buffer
        buffer += data
        try:
            if reply_bytes_missing(buffer) > 0:
                return None
            reply = parse_reply(buffer)
        except Socks5WireError as exc:
            return ReplyFailed(f"{exc} while {WAITING}")
        assert reply is not None  # reply_bytes_missing() returned 0
        if reply.reply_code != ReplyCode.SUCCEEDED:
            return ReplyFailed(describe_reply(reply.reply_code), reply.reply_code)
        rest = bytes(buffer[reply.bytes_consumed :])
        return ReplySucceeded(reply.bound_host, reply.bound_port, rest)

    def ended(self, error: str | None = None) -> ReplyFailed:
        """The stream ended (EOF, or a reset described by ``error``) before a full reply."""
        buffer = self._buffer
        if not buffer:
            how = error or "proxy closed the connection"
            return ReplyFailed(f"{how} before the CONNECT reply", before_any_byte=True)
        # Some servers send only VER REP before closing on failure: that REP is the answer.
        if len(buffer) >= 2 and buffer[0] == SOCKS_VERSION and buffer[1] != ReplyCode.SUCCEEDED:
            return ReplyFailed(describe_reply(buffer[1]), buffer[1])
        how = error or "proxy closed the connection"
        return ReplyFailed(f"{how} while {WAITING}")
