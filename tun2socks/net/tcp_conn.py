"""One TCP connection, server side, as a pure state machine (RFC 9293).

Theory of operation
-------------------
The client's kernel opens a connection to some address routed into the TUN; we play the
server.  The connection is created from the client's SYN and waits in LISTEN (the SYN
held) until the layer above has connected upstream: then `accept` sends the SYN-ACK
(SYN-RECEIVED), or `reject` answers the SYN with a RST.

Sequence numbers are unwrapped at the boundary: inside, every position is a plain
integer *offset* in the stream (0 is the first data byte, -1 our SYN), so comparisons
are ordinary `<`.  `_wire_snd` / `_wire_rcv` convert back to 32-bit wire numbers.

Receiving: in-order data goes to a bounded buffer; the advertised window is its free
space, so a slow upstream closes the window (backpressure).  Out-of-order data inside
the window is kept and merged when the gap fills; it triggers an immediate duplicate
ACK.  In-order data is acknowledged once per batch, when the stack flushes.

Sending: `send` appends to a bounded buffer; `flush` cuts segments at the flow's MSS
(min of the client's and ours, lowered by ICMP "too big"), within the client's window and
the congestion window (`congestion.py`).  Losses are repaired by fast retransmit after
three duplicate ACKs (NewReno) and by the RFC 6298 retransmission timer (`tcp_rtt.py`,
go-back-N).  A zero window is probed by the persist timer, for as long as the client
answers; an idle flow by keep-alives.

Checks against blind attacks follow RFC 5961: RSTs and SYNs not at the exact sequence
number and ACKs outside [SND.UNA - MAX.SND.WND, SND.NXT] get a (rate-limited) challenge
ACK instead of any effect.

Time is always an argument; nothing here reads a clock.
"""

from __future__ import annotations

from collections import deque

from tun2socks.net.events import (
    DataReceived,
    EofReceived,
    Event,
    FlowEnded,
    FlowReset,
)
from tun2socks.net.tcp import ACK, FIN, RST, SYN, TcpSegment
from tun2socks.net.tcp_config import (
    RECEIVING,
    SEQ_MASK,
    TcpConfig,
    TcpState,
    seq_diff,
    window_shift,
)
from tun2socks.net.tcp_sender import TcpSender

__all__ = ["TcpConfig", "TcpConnection", "TcpState", "seq_diff"]


class TcpConnection(TcpSender):
    """The server side of one TCP connection.  See the module docstring."""

    # Thousands of these live at once: slots keep each one small (TcpSender has the rest).
    __slots__ = (
        "_ack_pending",
        "_keepalives",
        "_last_adv_right",
        "_ooo",
        "_ooo_bytes",
        "_rcv_buffered",
        "_rcv_chunks",
        "_remote_fin",
        "_time_wait_deadline",
        "_window_scaling",
        "bytes_received",
        "created",
        "fin_received",
        "irs",
        "last_activity",
        "rcv_nxt",
        "rcv_wscale",
    )

    def __init__(
        self,
        flow_id: int,
        config: TcpConfig,
        version: int,
        client: tuple[bytes, int],
        server: tuple[bytes, int],
        syn: TcpSegment,
        iss: int,
        now: float,
        events: deque[Event],
        out: list[bytes],
    ) -> None:
        super().__init__(flow_id, config, version, client, server, syn, iss, events, out)
        self.created = now
        self.last_activity = now
        self._keepalives = 0  # unanswered keep-alive probes
        self._time_wait_deadline: float | None = None

        # Receive side (RFC 9293 3.3.1 "receive sequence variables"), as offsets.
        self.irs = syn.seq
        self.rcv_nxt = 0
        self.bytes_received = 0
        # A list, not a deque: an empty deque costs ~600 bytes, per flow that adds up.
        self._rcv_chunks: list[bytes | memoryview] = []
        self._rcv_buffered = 0
        self._ooo: dict[int, bytes] = {}
        self._ooo_bytes = 0
        self._remote_fin: int | None = None  # offset of a FIN that arrived ahead of data
        self.fin_received = False
        # Window scaling is in effect only if both SYNs carry the option (RFC 7323 2.2).
        self._window_scaling = syn.options.wscale is not None
        self.rcv_wscale = window_shift(config.recv_buffer) if self._window_scaling else 0

    # ---------------------------------------------------------------- properties

    @property
    def at_eof(self) -> bool:
        """The client sent FIN and every byte before it has been taken by `receive`."""
        return self.fin_received and not self._rcv_chunks

    @property
    def half_open(self) -> bool:
        return self.state in (TcpState.LISTEN, TcpState.SYN_RECEIVED)

    @property
    def deadline(self) -> float | None:
        """The earliest time at which `handle_timer` has work to do."""
        if self.state is TcpState.CLOSED:
            return None
        if self.state is TcpState.TIME_WAIT:
            return self._time_wait_deadline
        deadline = self._idle_deadline
        if self._rtx_deadline is not None:
            deadline = min(deadline, self._rtx_deadline)
        if self._persist_deadline is not None:
            deadline = min(deadline, self._persist_deadline)
        return deadline

    @property
    def _idle_deadline(self) -> float:
        """The next keep-alive probe (or the reset when they are used up)."""
        config = self.config
        return (
            self.last_activity + config.idle_timeout + self._keepalives * config.keepalive_interval
        )

    # ---------------------------------------------------------------- API of the layer above

    def accept(self, now: float) -> None:
        """The upstream is connected: answer the SYN with a SYN-ACK (RFC 9293 3.10.7.2)."""
        if self.state is not TcpState.LISTEN:
            raise RuntimeError(f"accept in state {self.state.value}")
        self.state = TcpState.SYN_RECEIVED
        self.snd_nxt = self.snd_max = 0
        self._send_syn_ack()
        self._rtt.start(0, now)
        self._rtx_deadline = now + self.rto

    def reject(self) -> None:
        """The upstream failed: answer the SYN with RST (RFC 9293 3.10.7.2, 'refused')."""
        if self.state is not TcpState.LISTEN:
            raise RuntimeError(f"reject in state {self.state.value}")
        self._emit_rst(0)
        self.state = TcpState.CLOSED

    def receive(self) -> bytes:
        """Take all buffered data; opens the receive window."""
        if not self._rcv_chunks:
            return b""
        data = b"".join(self._rcv_chunks)
        self._rcv_chunks.clear()
        self._rcv_buffered = 0
        # Window update (RFC 9293 3.8.6.2.2): only when it opens by a useful amount.
        opened = self.rcv_nxt + self.receive_window - self._last_adv_right
        if opened >= min(self.config.recv_buffer // 2, self.config.mss) and self.state in RECEIVING:
            self._ack_pending = True
        return data

    def shutdown(self) -> None:
        """No more data from upstream: send FIN after the queued data (RFC 9293 3.10.4)."""
        if self.fin_queued or self.state is TcpState.CLOSED:
            return
        self.fin_queued = True
        # In SYN-RECEIVED the FIN waits for the handshake to end (RFC 9293 3.10.4).
        if self.state is TcpState.ESTABLISHED:
            self.state = TcpState.FIN_WAIT_1
        elif self.state is TcpState.CLOSE_WAIT:
            self.state = TcpState.LAST_ACK

    def abort(self) -> None:
        """Reset the connection (RFC 9293 3.10.5)."""
        if self.state is TcpState.LISTEN:
            self.reject()
            return
        if self.state not in (TcpState.CLOSED, TcpState.TIME_WAIT):
            self._emit_rst(self.snd_max)  # SND.NXT is the highest sent
        self._close()

    def reset(self, reason: str) -> None:
        """Reset on our own initiative and report it (idle timeout, limits)."""
        if self.state is TcpState.CLOSED:
            return
        self.abort()
        self._events.append(FlowReset(self.flow_id, reason))

    def may_reopen(self, syn_seq: int) -> bool:
        """In TIME-WAIT: whether a new SYN may replace this flow, i.e. it is above RCV.NXT
        and so cannot be an old duplicate (RFC 6191 without timestamps, RFC 1122 4.2.2.13)."""
        return seq_diff(syn_seq, self._wire_rcv(self.rcv_nxt)) > 0

    # ---------------------------------------------------------------- segment arrival

    def receive_segment(self, seg: TcpSegment, now: float) -> None:
        """Process one segment from the client (RFC 9293 3.10.7)."""
        flags = seg.flags
        state = self.state
        if state is TcpState.CLOSED:
            return
        if state is TcpState.LISTEN:
            # Waiting for the upstream: a retransmitted SYN changes nothing.  A RST counts
            # only at the exact next sequence number (RFC 5961 3).
            if flags & RST and seg.seq == (self.irs + 1) & SEQ_MASK:
                self._close()
                self._events.append(FlowReset(self.flow_id, "reset by client"))
            return
        self.last_activity = now
        self._keepalives = 0
        if state is TcpState.SYN_RECEIVED and flags & SYN and not flags & ACK:
            if seg.seq == self.irs:  # our SYN-ACK was lost
                self._send_syn_ack()
            return

        # 1. Is the segment acceptable? (RFC 9293 3.10.7.4, first check)
        seg_off = self.rcv_nxt + seq_diff(seg.seq, self._wire_rcv(self.rcv_nxt))
        seg_len = len(seg.payload) + (1 if flags & FIN else 0) + (1 if flags & SYN else 0)
        wnd = self.receive_window
        if seg_len == 0:
            ok = seg_off == self.rcv_nxt if wnd == 0 else 0 <= seg_off - self.rcv_nxt < wnd
        elif wnd == 0:
            ok = False
        else:
            ok = seg_off < self.rcv_nxt + wnd and seg_off + seg_len > self.rcv_nxt
        if not ok:
            # Dropped with an ACK; its ACK field is never used (RFC 5961 5.2), except for
            # a zero-window probe at RCV.NXT: RFC 9293 3.10.7.4 makes an allowance for ACKs.
            if flags & RST:
                return
            if state is TcpState.TIME_WAIT and flags & FIN:
                # A retransmitted FIN: restart the 2MSL wait (RFC 9293 3.10.7.4).
                self._time_wait_deadline = now + self.config.time_wait
            if (
                wnd == 0
                and seg_off == self.rcv_nxt
                and flags & ACK
                and not flags & SYN
                and state is not TcpState.SYN_RECEIVED
                and not self._process_ack(seg, now, seg_off)
            ):
                return
            if self.state is not TcpState.CLOSED:
                self._ack_now()
            return

        # 2. RST (RFC 5961 3.2: exact match resets, otherwise a challenge ACK).
        if flags & RST:
            if seg_off == self.rcv_nxt:
                was_time_wait = state is TcpState.TIME_WAIT
                self._close()
                if not was_time_wait:
                    self._events.append(FlowReset(self.flow_id, "reset by client"))
            else:
                self._challenge_ack(now)
            return
        # 3. SYN in a synchronized state: challenge ACK (RFC 5961 4.2).
        if flags & SYN:
            self._challenge_ack(now)
            return
        # 4. ACK.
        if not flags & ACK:
            return
        if state is TcpState.SYN_RECEIVED:
            if self._unwrap_ack(seg.ack) != 0:
                self._emit_rst_raw(seg.ack)  # RFC 9293 3.10.7.4, SYN-RECEIVED, bad ACK
                return
            # The upstream may have closed before the handshake ended.
            self.state = TcpState.FIN_WAIT_1 if self.fin_queued else TcpState.ESTABLISHED
            self._wl1, self._wl2 = seg_off, -1
        if not self._process_ack(seg, now, seg_off):
            return
        if self.state is TcpState.CLOSED:
            return

        # 5. Data.
        if seg.payload and self.state in RECEIVING:
            self._receive_data(seg_off, seg.payload, now)

        # 6. FIN.
        if flags & FIN:
            fin_off = seg_off + len(seg.payload)
            if fin_off == self.rcv_nxt:
                self._receive_fin(now)
            elif fin_off > self.rcv_nxt:
                self._remote_fin = fin_off
            elif self.state is TcpState.TIME_WAIT:
                # A retransmitted FIN: ACK it again and restart the 2MSL wait (RFC 9293 3.10.7.4).
                self._time_wait_deadline = now + self.config.time_wait
                self._ack_now()

    def _maybe_advance_fin(self, ack_off: int, now: float) -> None:
        """Our FIN acknowledged: FIN-WAIT-1, CLOSING and LAST-ACK move on."""
        if not self.fin_queued:
            return
        fin_off = self._buf_start + len(self._snd_buf)
        if ack_off != fin_off + 1:
            return
        if self.state is TcpState.FIN_WAIT_1:
            self.state = TcpState.FIN_WAIT_2
        elif self.state is TcpState.CLOSING:
            self._enter_time_wait(now)
            self._events.append(FlowEnded(self.flow_id))
        elif self.state is TcpState.LAST_ACK:
            self._close()
            self._events.append(FlowEnded(self.flow_id))

    def _receive_data(self, seg_off: int, payload: bytes | memoryview, now: float) -> None:
        start = seg_off
        if start < self.rcv_nxt:
            payload = payload[self.rcv_nxt - start :]
            start = self.rcv_nxt
        right = self.rcv_nxt + self.receive_window
        if start + len(payload) > right:
            payload = payload[: right - start]
        if not payload:
            self._ack_now()  # a duplicate: tell the client where we are
            return
        if start != self.rcv_nxt:
            known = self._ooo.get(start)
            grown = len(payload) - (len(known) if known is not None else 0)
            # Bounded by the window: overlapping segments are not each stored whole.
            if grown > 0 and self._ooo_bytes + grown <= self.receive_window:
                self._ooo[start] = bytes(payload)
                self._ooo_bytes += grown
            self._ack_now()  # a hole: immediate duplicate ACK (RFC 5681 4.2)
            return
        was_empty = not self._rcv_chunks
        self._append(payload)
        if self._ooo:
            for off in sorted(self._ooo):
                if off > self.rcv_nxt:
                    break
                chunk = self._ooo.pop(off)
                self._ooo_bytes -= len(chunk)
                if off + len(chunk) > self.rcv_nxt:
                    self._append(chunk[self.rcv_nxt - off :])
            # Data right of the (moving) window edge is never stored, so nothing is lost here.
        self._ack_pending = True
        if was_empty:
            self._events.append(DataReceived(self.flow_id))
        if self._remote_fin is not None and self._remote_fin == self.rcv_nxt:
            self._remote_fin = None
            self._receive_fin(now)

    def _append(self, data: bytes | memoryview) -> None:
        self._rcv_chunks.append(data)
        self._rcv_buffered += len(data)
        self.rcv_nxt += len(data)
        self.bytes_received += len(data)

    def _receive_fin(self, now: float) -> None:
        self.rcv_nxt += 1
        self.fin_received = True
        self._ack_pending = True
        state = self.state
        if state is TcpState.ESTABLISHED:
            self.state = TcpState.CLOSE_WAIT
        elif state is TcpState.FIN_WAIT_1:
            # Our FIN is not acknowledged yet (else we would be in FIN-WAIT-2).
            self.state = TcpState.CLOSING
        elif state is TcpState.FIN_WAIT_2:
            self._enter_time_wait(now)
        self._events.append(EofReceived(self.flow_id))
        if self.state is TcpState.TIME_WAIT:
            self._events.append(FlowEnded(self.flow_id))

    def _enter_time_wait(self, now: float) -> None:
        self.state = TcpState.TIME_WAIT
        self._time_wait_deadline = now + self.config.time_wait
        self._rtx_deadline = None
        self._persist_deadline = None

    # ---------------------------------------------------------------- output

    # ---------------------------------------------------------------- timers

    def handle_timer(self, now: float) -> None:
        if self.state is TcpState.CLOSED:
            return
        if self.state is TcpState.TIME_WAIT:
            if self._time_wait_deadline is not None and now >= self._time_wait_deadline:
                self._close()
            return
        if now >= self._idle_deadline and self._on_idle():
            return
        rtx = self._rtx_deadline
        if rtx is not None and now >= rtx and self._on_retransmission_timeout(now):
            self.reset("retransmission timeout")
            return
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._on_persist_timeout(now)

    def _on_idle(self) -> bool:
        """Keep-alive (RFC 9293 3.8.4): a probe at SND.UNA - 1 (= SND.NXT - 1 when idle), which
        any live client answers; reset when `keepalive_probes` went unanswered, or a
        half-open flow at once.  True if the flow was reset."""
        if self.half_open or self._keepalives >= self.config.keepalive_probes:
            self.reset("idle timeout" if self.half_open else "keep-alive timeout")
            return True
        self._keepalives += 1
        self._emit(self.snd_una - 1, ACK)
        return False

    # ---------------------------------------------------------------- helpers

    def _close(self) -> None:
        self.state = TcpState.CLOSED
        self._rtx_deadline = None
        self._persist_deadline = None
        self._time_wait_deadline = None
        self._snd_buf = bytearray()
        self._rcv_chunks.clear()
        self._ooo.clear()
        self._ooo_bytes = 0
