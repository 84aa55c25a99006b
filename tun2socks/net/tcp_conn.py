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

Sending: `send` appends to a bounded buffer; `flush` cuts segments at the send segment
size, within the client's window.  The link is the local kernel, so there is no
congestion window; losses (a full TUN queue) are repaired by fast retransmit after three
duplicate ACKs and by the RFC 6298 retransmission timer (go-back-N).  A zero window is
probed by the persist timer.

Time is always an argument; nothing here reads a clock.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from tun2socks.net.checksum import pseudo_header_sum
from tun2socks.net.events import (
    DataReceived,
    EofReceived,
    Event,
    FlowEnded,
    FlowReset,
    SendSpaceAvailable,
)
from tun2socks.net.ip import PROTO_TCP
from tun2socks.net.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions, TcpSegment, build_tcp_packet

SEQ_MASK = 0xFFFFFFFF
DEFAULT_MSS_V4 = 536  # RFC 9293 3.7.1: assumed when the SYN has no MSS option
DEFAULT_MSS_V6 = 1220  # RFC 8200 8.3
MAX_WINDOW_FIELD = 0xFFFF


def seq_diff(a: int, b: int) -> int:
    """`a - b` in 32-bit sequence space, as a signed number (RFC 9293 3.4)."""
    d = (a - b) & SEQ_MASK
    return d - 0x1_0000_0000 if d & 0x8000_0000 else d


def window_shift(buffer_size: int) -> int:
    """The smallest RFC 7323 shift that lets `buffer_size` be advertised."""
    shift = 0
    while (buffer_size >> shift) > MAX_WINDOW_FIELD and shift < 14:
        shift += 1
    return shift


class TcpState(enum.Enum):
    LISTEN = "LISTEN"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME-WAIT"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"
    CLOSED = "CLOSED"


# States in which the client may still send us data.
_RECEIVING = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})
# States in which we may still send data or our FIN.
_SENDING = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.CLOSE_WAIT,
        TcpState.FIN_WAIT_1,
        TcpState.LAST_ACK,
        TcpState.CLOSING,
    }
)


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Per-connection parameters, fixed by the stack."""

    mss: int  # advertised in our SYN-ACK: the TUN MTU minus the IP and TCP headers
    recv_buffer: int = 256 * 1024
    send_buffer: int = 256 * 1024
    max_segment: int | None = None  # with TSO: segment size regardless of the client's MSS
    offload: bool = False  # checksums left to the kernel (vnet header)
    idle_timeout: float = 600.0
    time_wait: float = 2.0
    rto_initial: float = 1.0  # RFC 6298 2.1
    # RFC 6298 2.4 says 1 s; like Linux we use 200 ms, the link being the local kernel.
    rto_min: float = 0.2
    rto_max: float = 60.0
    max_retransmissions: int = 8
    max_syn_ack_retransmissions: int = 5  # as Linux's tcp_synack_retries
    persist_max: float = 10.0


class TcpConnection:
    """The server side of one TCP connection.  See the module docstring."""

    # Thousands of these live at once: slots keep each one small.
    __slots__ = (
        "_ack_pending",
        "_addr_sum",
        "_buf_start",
        "_dupacks",
        "_events",
        "_last_adv_right",
        "_ooo",
        "_ooo_bytes",
        "_out",
        "_persist_backoff",
        "_persist_deadline",
        "_rcv_buffered",
        "_rcv_chunks",
        "_recover",
        "_remote_fin",
        "_retries",
        "_rtt_probe",
        "_rttvar",
        "_rtx_deadline",
        "_send_blocked",
        "_snd_buf",
        "_srtt",
        "_time_wait_deadline",
        "_window_scaling",
        "_wl1",
        "_wl2",
        "bytes_received",
        "bytes_sent",
        "config",
        "created",
        "fin_queued",
        "fin_received",
        "flow_id",
        "irs",
        "iss",
        "last_activity",
        "local_addr",
        "local_port",
        "peer_mss",
        "rcv_nxt",
        "rcv_wscale",
        "remote_addr",
        "remote_port",
        "retransmissions",
        "rto",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "snd_wnd",
        "snd_wscale",
        "state",
        "version",
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
        self.flow_id = flow_id
        self.config = config
        self.version = version
        self.remote_addr, self.remote_port = client
        self.local_addr, self.local_port = server
        self._addr_sum = pseudo_header_sum(self.local_addr, self.remote_addr, PROTO_TCP, 0)
        self._events = events
        self._out = out
        self.state = TcpState.LISTEN
        self.created = now
        self.last_activity = now

        # Receive side (RFC 9293 3.3.1 "receive sequence variables"), as offsets.
        self.irs = syn.seq
        self.rcv_nxt = 0
        # A list, not a deque: an empty deque costs ~600 bytes, per flow that adds up.
        self._rcv_chunks: list[bytes | memoryview] = []
        self._rcv_buffered = 0
        self._ooo: dict[int, bytes] = {}
        self._ooo_bytes = 0
        self._remote_fin: int | None = None  # offset of a FIN that arrived ahead of data
        self.fin_received = False
        self._ack_pending = False
        self._last_adv_right = 0  # right edge of the window we last advertised
        # Window scaling is in effect only if both SYNs carry the option (RFC 7323 2.2).
        peer_ws = syn.options.wscale
        self._window_scaling = peer_ws is not None
        self.rcv_wscale = window_shift(config.recv_buffer) if peer_ws is not None else 0
        self.snd_wscale = peer_ws if peer_ws is not None else 0
        default_mss = DEFAULT_MSS_V4 if version == 4 else DEFAULT_MSS_V6
        self.peer_mss = syn.options.mss or default_mss

        # Send side, as offsets: our SYN is at -1, data starts at 0.
        self.iss = iss
        self.snd_una = -1
        self.snd_nxt = -1
        self.snd_max = -1  # highest offset sent; SND.NXT goes back below it on a timeout
        self.snd_wnd = syn.window  # never scaled in a SYN (RFC 7323 2.2)
        self._wl1 = 0
        self._wl2 = -1
        self._snd_buf = bytearray()
        self._buf_start = 0  # offset of _snd_buf[0]
        self.fin_queued = False
        self._send_blocked = False

        # Timers (absolute times; None when not armed).
        self.rto = config.rto_initial
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rtt_probe: tuple[int, float] | None = None  # (offset acked, time sent)
        self._rtx_deadline: float | None = None
        self._retries = 0
        self._persist_deadline: float | None = None
        self._persist_backoff = 0
        self._time_wait_deadline: float | None = None
        self._dupacks = 0
        self._recover: int | None = None

        # Counters for the API.
        self.bytes_received = 0
        self.bytes_sent = 0
        self.retransmissions = 0

    # ---------------------------------------------------------------- properties

    @property
    def segment_size(self) -> int:
        """Bytes of payload per segment we send."""
        if self.config.max_segment is not None:
            return self.config.max_segment
        return min(self.peer_mss, self.config.mss)

    @property
    def receive_window(self) -> int:
        return max(0, self.config.recv_buffer - self._rcv_buffered)

    @property
    def send_space(self) -> int:
        """Bytes `send` can still take before the send buffer is full."""
        return self.config.send_buffer - len(self._snd_buf)

    @property
    def at_eof(self) -> bool:
        """The client sent FIN and every byte before it has been taken by `receive`."""
        return self.fin_received and not self._rcv_chunks

    @property
    def half_open(self) -> bool:
        return self.state in (TcpState.LISTEN, TcpState.SYN_RECEIVED)

    @property
    def wants_flush(self) -> bool:
        """Whether `flush` has something to send."""
        if self._ack_pending:
            return True
        if self.state not in _SENDING:
            return False
        data_end = self._buf_start + len(self._snd_buf)
        if self.snd_nxt < data_end and self.snd_nxt < self.snd_una + self.snd_wnd:
            return True
        if self.snd_wnd == 0 and self._persist_deadline is None and self.snd_nxt < data_end:
            return self.snd_nxt == self.snd_una  # flush arms the persist timer (3.8.6.1)
        return self.fin_queued and self.snd_nxt == data_end

    @property
    def deadline(self) -> float | None:
        """The earliest time at which `handle_timer` has work to do."""
        if self.state is TcpState.CLOSED:
            return None
        if self.state is TcpState.TIME_WAIT:
            return self._time_wait_deadline
        deadline = self.last_activity + self.config.idle_timeout
        if self._rtx_deadline is not None:
            deadline = min(deadline, self._rtx_deadline)
        if self._persist_deadline is not None:
            deadline = min(deadline, self._persist_deadline)
        return deadline

    # ---------------------------------------------------------------- API of the layer above

    def accept(self, now: float) -> None:
        """The upstream is connected: answer the SYN with a SYN-ACK (RFC 9293 3.10.7.2)."""
        if self.state is not TcpState.LISTEN:
            raise RuntimeError(f"accept in state {self.state.value}")
        self.state = TcpState.SYN_RECEIVED
        self.snd_nxt = self.snd_max = 0
        self._send_syn_ack()
        self._rtt_probe = (0, now)
        self._rtx_deadline = now + self.rto

    def reject(self) -> None:
        """The upstream failed: answer the SYN with RST (RFC 9293 3.10.7.2, 'refused')."""
        if self.state is not TcpState.LISTEN:
            raise RuntimeError(f"reject in state {self.state.value}")
        self._emit_rst(0)
        self.state = TcpState.CLOSED

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue `data` for the client; return the space left (<= 0: stop reading upstream)."""
        if self.fin_queued:
            raise RuntimeError("send after shutdown")
        if self.state is TcpState.CLOSED:
            return 0
        self._snd_buf += data
        space = self.send_space
        if space <= 0:
            self._send_blocked = True
        return space

    def receive(self) -> bytes:
        """Take all buffered data; opens the receive window."""
        if not self._rcv_chunks:
            return b""
        data = b"".join(self._rcv_chunks)
        self._rcv_chunks.clear()
        self._rcv_buffered = 0
        # Window update (RFC 9293 3.8.6.2.2): only when it opens by a useful amount.
        opened = self.rcv_nxt + self.receive_window - self._last_adv_right
        if (
            opened >= min(self.config.recv_buffer // 2, self.config.mss)
            and self.state in _RECEIVING
        ):
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

    # ---------------------------------------------------------------- segment arrival

    def receive_segment(self, seg: TcpSegment, now: float) -> None:
        """Process one segment from the client (RFC 9293 3.10.7)."""
        flags = seg.flags
        state = self.state
        if state is TcpState.CLOSED:
            return
        self.last_activity = now
        if state is TcpState.LISTEN:
            # Waiting for the upstream: a retransmitted SYN changes nothing.
            if flags & RST:
                self._close()
                self._events.append(FlowReset(self.flow_id, "reset by client"))
            return
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
        # A zero-window probe or an old duplicate still carries a useful ACK.
        if not ok:
            if flags & RST:
                return
            if state is TcpState.TIME_WAIT and flags & FIN:
                # A retransmitted FIN: restart the 2MSL wait (RFC 9293 3.10.7.4).
                self._time_wait_deadline = now + self.config.time_wait
            if flags & ACK and not flags & SYN and state is not TcpState.SYN_RECEIVED:
                self._process_ack(seg, now, seg_off)
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
                self._ack_now()
            return
        # 3. SYN in a synchronized state: challenge ACK (RFC 5961 4.2).
        if flags & SYN:
            self._ack_now()
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
        if seg.payload and self.state in _RECEIVING:
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

    def _unwrap_ack(self, ack: int) -> int:
        return self.snd_una + seq_diff(ack, self._wire_snd(self.snd_una))

    def _process_ack(self, seg: TcpSegment, now: float, seg_off: int) -> bool:
        """Apply the ACK field; False if the segment must be dropped."""
        ack_off = self._unwrap_ack(seg.ack)
        if ack_off > self.snd_max:
            self._ack_now()  # acknowledges something not yet sent
            return False
        if ack_off > self.snd_nxt:  # data sent before a go-back-N arrived after all
            self.snd_nxt = ack_off
        window = seg.window << self.snd_wscale
        data_end = self._buf_start + len(self._snd_buf)
        if ack_off > self.snd_una:
            self._on_new_ack(ack_off, now, data_end)
        elif (
            ack_off == self.snd_una
            and not seg.payload
            and not seg.flags & (SYN | FIN)
            and self.snd_max > self.snd_una
            and window == self.snd_wnd
        ):
            self._dupacks += 1
            if self._dupacks == 3:  # fast retransmit (RFC 5681 3.2)
                self._recover = self.snd_max
                self._retransmit_one(now)
        # Window update (RFC 9293 3.10.7.4, SND.WL1/SND.WL2 rule).
        if seg_off > self._wl1 or (seg_off == self._wl1 and ack_off >= self._wl2):
            self.snd_wnd = window
            self._wl1, self._wl2 = seg_off, ack_off
        self._arm_persist(now)
        self._maybe_advance_fin(ack_off, now)
        return True

    def _on_new_ack(self, ack_off: int, now: float, data_end: int) -> None:
        self.snd_una = ack_off
        acked_data = min(ack_off, data_end) - self._buf_start
        if acked_data > 0:
            del self._snd_buf[:acked_data]
            self._buf_start += acked_data
            self.bytes_sent += acked_data
        if self._rtt_probe is not None and ack_off >= self._rtt_probe[0]:
            self._update_rto(now - self._rtt_probe[1])
            self._rtt_probe = None
        self._retries = 0
        if self._recover is not None:
            if ack_off < self._recover:
                self._retransmit_one(now)  # partial ACK: next hole (RFC 6582 3.2)
            else:
                self._recover = None
        self._dupacks = 0
        # RFC 6298 5.2/5.3: stop the timer when all is acknowledged, else restart it.
        self._rtx_deadline = None if ack_off >= self.snd_max else now + self.rto
        if self._send_blocked and len(self._snd_buf) <= self.config.send_buffer // 2:
            self._send_blocked = False
            self._events.append(SendSpaceAvailable(self.flow_id))

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

    def flush(self, now: float) -> None:
        """Send what the window allows, then a pure ACK if one is still owed."""
        if self.state in _SENDING:
            data_end = self._buf_start + len(self._snd_buf)
            wnd_end = self.snd_una + self.snd_wnd
            seg_size = self.segment_size
            while self.snd_nxt < data_end and self.snd_nxt < wnd_end:
                n = min(seg_size, data_end - self.snd_nxt, wnd_end - self.snd_nxt)
                self.snd_nxt += self._transmit(self.snd_nxt, n)
                if self._rtt_probe is None and self.snd_nxt > self.snd_max:
                    self._rtt_probe = (self.snd_nxt, now)
            if self.fin_queued and self.snd_nxt == data_end:
                self.snd_nxt += self._transmit(data_end, 0)
            self.snd_max = max(self.snd_max, self.snd_nxt)
            if self.snd_max > self.snd_una and self._rtx_deadline is None:
                self._rtx_deadline = now + self.rto
            self._arm_persist(now)
        if self._ack_pending and self.state is not TcpState.CLOSED:
            self._emit(self.snd_nxt, ACK)

    def _transmit(self, off: int, max_len: int) -> int:
        """Send the data at `off` (up to `max_len` bytes) and our FIN if it follows; return the
        sequence space used."""
        data_end = self._buf_start + len(self._snd_buf)
        n = min(max_len, data_end - off)
        start = off - self._buf_start
        payload = bytes(self._snd_buf[start : start + n]) if n > 0 else b""
        flags = ACK
        used = n
        if self.fin_queued and off + n == data_end:
            flags |= FIN
            used += 1
        if n and off + n == data_end:
            flags |= PSH
        self._emit(off, flags, payload)
        return used

    def _retransmit_one(self, now: float) -> None:
        if self.snd_una < 0:
            self._send_syn_ack()
        else:
            self._transmit(self.snd_una, self.segment_size)
        self.retransmissions += 1
        self._rtt_probe = None  # Karn's algorithm
        self._rtx_deadline = now + self.rto

    def _send_syn_ack(self) -> None:
        options = TcpOptions(mss=self.config.mss)
        if self._window_scaling:
            options.wscale = self.rcv_wscale
        # The window in a SYN is never scaled (RFC 7323 2.2).
        self._emit(-1, SYN | ACK, b"", options.build(), unscaled=True)

    def _ack_now(self) -> None:
        self._emit(self.snd_nxt, ACK)

    def _emit(
        self,
        seq_off: int,
        flags: int,
        payload: bytes | memoryview = b"",
        options: bytes = b"",
        unscaled: bool = False,
    ) -> None:
        wnd = self.receive_window
        if unscaled:
            field = min(wnd, MAX_WINDOW_FIELD)
        else:
            field = min(wnd >> self.rcv_wscale, MAX_WINDOW_FIELD)
            self._last_adv_right = self.rcv_nxt + (field << self.rcv_wscale)
        self._build(
            self._wire_snd(seq_off), self._wire_rcv(self.rcv_nxt), flags, field, options, payload
        )
        self._ack_pending = False

    def _emit_rst(self, seq_off: int) -> None:
        """RST|ACK at `seq_off`, acknowledging everything received."""
        self._build(self._wire_snd(seq_off), self._wire_rcv(self.rcv_nxt), RST | ACK, 0)

    def _emit_rst_raw(self, seq: int) -> None:
        """RST carrying the client's own ACK number as its sequence number (RFC 9293 3.5.2)."""
        self._build(seq, 0, RST, 0)

    def _build(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        options: bytes = b"",
        payload: bytes | memoryview = b"",
    ) -> None:
        self._out.append(
            build_tcp_packet(
                self.version,
                self.local_addr,
                self.remote_addr,
                self._addr_sum,
                self.local_port,
                self.remote_port,
                seq,
                ack,
                flags,
                window,
                options,
                payload,
                offload=self.config.offload,
            )
        )

    # ---------------------------------------------------------------- timers

    def handle_timer(self, now: float) -> None:
        if self.state is TcpState.CLOSED:
            return
        if self.state is TcpState.TIME_WAIT:
            if self._time_wait_deadline is not None and now >= self._time_wait_deadline:
                self._close()
            return
        if now >= self.last_activity + self.config.idle_timeout:
            self.reset("idle timeout")
            return
        if self._rtx_deadline is not None and now >= self._rtx_deadline:
            self._on_retransmission_timeout(now)
        if self._persist_deadline is not None and now >= self._persist_deadline:
            # Zero-window probe: an ACK one byte below SND.UNA makes the client answer with
            # its current window (the form Linux uses; RFC 9293 3.8.6.1 allows either).
            self._emit(self.snd_una - 1, ACK)
            self._persist_backoff += 1
            self._persist_deadline = now + min(
                self.rto * (1 << min(self._persist_backoff, 10)), self.config.persist_max
            )

    def _on_retransmission_timeout(self, now: float) -> None:
        self._retries += 1
        limit = (
            self.config.max_syn_ack_retransmissions
            if self.state is TcpState.SYN_RECEIVED
            else self.config.max_retransmissions
        )
        if self._retries > limit:
            self.reset("retransmission timeout")
            return
        self.rto = min(self.rto * 2, self.config.rto_max)  # RFC 6298 5.5
        self._recover = None
        self._dupacks = 0
        if self.state is TcpState.SYN_RECEIVED:
            self._retransmit_one(now)
            return
        # Go back N (RFC 6298 5.4): resend from the oldest unacknowledged byte.
        self.snd_nxt = self.snd_una
        self._rtx_deadline = None
        self.retransmissions += 1
        self._rtt_probe = None  # Karn's algorithm: no sample from retransmitted data
        self.flush(now)

    def _arm_persist(self, now: float) -> None:
        """Arm the persist timer when data waits behind a zero window and nothing is in flight."""
        data_end = self._buf_start + len(self._snd_buf)
        waiting = self.snd_nxt < data_end or (self.fin_queued and self.snd_nxt == data_end)
        if self.snd_wnd == 0 and waiting and self.snd_nxt == self.snd_una:
            if self._persist_deadline is None:
                self._persist_deadline = now + max(self.rto, self.config.rto_min)
        else:
            self._persist_deadline = None
            self._persist_backoff = 0

    def _update_rto(self, rtt: float) -> None:
        """RFC 6298 2.2 and 2.3."""
        if self._srtt is None:
            self._srtt = rtt
            self._rttvar = rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self.rto = min(max(self._srtt + max(0.001, 4 * self._rttvar), self.config.rto_min), 60.0)

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

    def _wire_snd(self, off: int) -> int:
        return (self.iss + 1 + off) & SEQ_MASK

    def _wire_rcv(self, off: int) -> int:
        return (self.irs + 1 + off) & SEQ_MASK
