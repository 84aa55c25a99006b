"""The sending half of a TCP connection and the writer of its segments (sans-IO).

`TcpConnection` (tcp_conn.py) is the state machine; this base class holds what it sends:
the send buffer, SND.UNA/SND.NXT/SND.WND, the flow's MSS, the congestion window
(`congestion.py`), retransmission and persist timing (`tcp_rtt.py`), and the building of
every segment the flow sends.  Offsets are the stream offsets of tcp_conn.py.
"""

from __future__ import annotations

from collections import deque

from tun2socks.net.checksum import pseudo_header_sum
from tun2socks.net.congestion import NewReno
from tun2socks.net.events import Event, SendSpaceAvailable
from tun2socks.net.ip import PROTO_TCP
from tun2socks.net.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    GsoPacket,
    TcpOptions,
    TcpSegment,
    build_tcp_packet,
)
from tun2socks.net.tcp_config import (
    DEFAULT_MSS_V4,
    DEFAULT_MSS_V6,
    MAX_WINDOW_FIELD,
    MIN_PEER_MSS,
    MIN_PMTU_MSS,
    SENDING,
    SEQ_MASK,
    TcpConfig,
    TcpState,
    seq_diff,
)
from tun2socks.net.tcp_rtt import RttEstimator


class TcpSender:
    """Send-side state and segment output of one connection; see the module docstring."""

    __slots__ = (
        "_ack_pending",
        "_addr_sum",
        "_buf_start",
        "_cc",
        "_challenge_count",
        "_challenge_start",
        "_dupacks",
        "_events",
        "_last_adv_right",
        "_max_snd_wnd",
        "_out",
        "_persist_deadline",
        "_retries",
        "_rtt",
        "_rtx_deadline",
        "_seg_size",
        "_send_blocked",
        "_snd_buf",
        "_wl1",
        "_wl2",
        "bytes_sent",
        "config",
        "fin_queued",
        "flow_id",
        "iss",
        "local_addr",
        "local_port",
        "mss",
        "peer_mss",
        "remote_addr",
        "remote_port",
        "retransmissions",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "snd_wnd",
        "snd_wscale",
        "state",
        "version",
    )

    # The receive side, kept by TcpConnection: acknowledged and advertised in every segment.
    irs: int
    rcv_nxt: int
    rcv_wscale: int
    _rcv_buffered: int
    _window_scaling: bool

    def __init__(
        self,
        flow_id: int,
        config: TcpConfig,
        version: int,
        client: tuple[bytes, int],
        server: tuple[bytes, int],
        syn: TcpSegment,
        iss: int,
        events: deque[Event],
        out: list[bytes],
    ) -> None:
        self.flow_id = flow_id
        self.config = config
        self.version = version
        self.state = TcpState.LISTEN
        self.remote_addr, self.remote_port = client
        self.local_addr, self.local_port = server
        self._addr_sum = pseudo_header_sum(self.local_addr, self.remote_addr, PROTO_TCP, 0)
        self._events = events
        self._out = out
        self._ack_pending = False  # an ACK is owed: the next flush sends one
        self._last_adv_right = 0  # right edge of the receive window we last advertised
        # Offsets: our SYN is at -1, data starts at 0.
        self.iss = iss
        self.snd_una = -1
        self.snd_nxt = -1
        self.snd_max = -1  # highest offset sent; SND.NXT goes back below it on a timeout
        self.snd_wnd = syn.window  # never scaled in a SYN (RFC 7323 2.2)
        self._max_snd_wnd = syn.window  # MAX.SND.WND of RFC 5961 5.2
        peer_ws = syn.options.wscale
        self.snd_wscale = peer_ws if peer_ws is not None else 0
        self._wl1 = 0
        self._wl2 = -1
        self._snd_buf = bytearray()
        self._buf_start = 0  # offset of _snd_buf[0]
        self.fin_queued = False
        self._send_blocked = False
        # The effective send MSS (RFC 9293 3.7.1) and the payload of one packet we build.
        default_mss = DEFAULT_MSS_V4 if version == 4 else DEFAULT_MSS_V6
        self.peer_mss = max(syn.options.mss or default_mss, MIN_PEER_MSS)
        self.mss = self._seg_size = 0
        self._set_mss(min(self.peer_mss, config.mss))
        self._cc = NewReno(self.mss)
        self._rtt = RttEstimator(
            config.rto_initial, config.rto_min, config.rto_max, config.persist_max
        )
        self._rtx_deadline: float | None = None
        self._retries = 0
        self._persist_deadline: float | None = None
        self._dupacks = 0
        self._challenge_start = 0.0
        self._challenge_count = 0
        self.bytes_sent = 0
        self.retransmissions = 0

    @property
    def receive_window(self) -> int:
        return max(0, self.config.recv_buffer - self._rcv_buffered)

    @property
    def rto(self) -> float:
        return self._rtt.rto

    @property
    def cwnd(self) -> int:
        return self._cc.cwnd

    @property
    def send_space(self) -> int:
        """Bytes `send` can still take before the send buffer is full."""
        return self.config.send_buffer - len(self._snd_buf)

    @property
    def wants_flush(self) -> bool:
        """Whether `flush` has something to send (or the persist timer to arm)."""
        if self._ack_pending:
            return True
        if self.state not in SENDING:
            return False
        data_end = self._buf_start + len(self._snd_buf)
        snd_nxt = self.snd_nxt
        usable = self.snd_una + min(self.snd_wnd, self._cc.cwnd) - snd_nxt
        if snd_nxt < data_end:
            if usable > 0:
                return self._may_send(usable, data_end - snd_nxt)
        elif not self.fin_queued or snd_nxt != data_end:
            return False
        elif usable > 0:
            return True  # the FIN
        # Nothing fits: flush arms the persist timer (RFC 9293 3.8.6.1).
        return self.snd_wnd == 0 and self._persist_deadline is None and snd_nxt == self.snd_una

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

    def path_mtu_reduced(self, mtu: int, quoted_seq: int, now: float) -> bool:
        """ICMP "fragmentation needed" / "packet too big" quoting our segment at `quoted_seq`
        (RFC 1191, RFC 8201): lower the MSS and resend what the too-big packet carried.
        Ignored unless the quoted sequence number is in flight (RFC 5927 4.1)."""
        off = self.snd_una + seq_diff(quoted_seq, self._wire_snd(self.snd_una))
        if not (self.snd_una <= off < self.snd_max) or self.state not in SENDING:
            return False
        headers = 40 if self.version == 4 else 60
        mss = max(mtu - headers, MIN_PMTU_MSS[self.version])
        if mss >= self.mss:
            return False
        self._set_mss(mss)
        # Everything from SND.UNA was probably cut: resend now, without a backoff (RFC 1191
        # 6.5 asks for prompt retransmission).
        self.snd_nxt = self.snd_una
        self._rtt.cancel()
        self._dupacks = 0
        self._rtx_deadline = None
        self.flush(now)
        return True

    def _unwrap_ack(self, ack: int) -> int:
        return self.snd_una + seq_diff(ack, self._wire_snd(self.snd_una))

    def _process_ack(self, seg: TcpSegment, now: float, seg_off: int) -> bool:
        """Apply the ACK field; False if the segment must be dropped."""
        ack_off = self._unwrap_ack(seg.ack)
        # RFC 5961 5.2: acceptable only in [SND.UNA - MAX.SND.WND, SND.NXT]; SND.NXT is our
        # highest sent, SND.MAX (it goes back on a timeout).
        if ack_off > self.snd_max or ack_off < self.snd_una - self._max_snd_wnd:
            self._challenge_ack(now)
            return False
        if ack_off > self.snd_nxt:  # data sent before a go-back-N arrived after all
            self.snd_nxt = ack_off
        window = seg.window << self.snd_wscale
        if ack_off > self.snd_una:
            self._on_new_ack(ack_off, now)
        elif (
            ack_off == self.snd_una
            and not seg.payload
            and not seg.flags & (SYN | FIN)
            and self.snd_nxt > self.snd_una  # data in flight (not pulled back by a timeout)
            and window == self.snd_wnd
            and window  # probe answers of a closed window are not losses
        ):
            self._dupacks += 1
            flight = self.snd_max - self.snd_una
            if self._cc.on_dupack(self._dupacks, ack_off, flight, self.snd_max, self.mss):
                self._retransmit_one(now)  # fast retransmit (RFC 5681 3.2, RFC 6582 3.2)
        # Window update (RFC 9293 3.10.7.4): only from an ACK in [SND.UNA, SND.NXT], and only
        # from a segment newer than the last update (SND.WL1/SND.WL2).
        if ack_off >= self.snd_una and (
            seg_off > self._wl1 or (seg_off == self._wl1 and ack_off >= self._wl2)
        ):
            self.snd_wnd = window
            if window > self._max_snd_wnd:
                self._max_snd_wnd = window
            self._wl1, self._wl2 = seg_off, ack_off
        self._arm_persist(now)
        self._maybe_advance_fin(ack_off, now)
        return True

    def _on_new_ack(self, ack_off: int, now: float) -> None:
        self.snd_una = ack_off
        data_end = self._buf_start + len(self._snd_buf)
        acked = min(ack_off, data_end) - self._buf_start  # data bytes: not SYN nor FIN
        if acked > 0:
            del self._snd_buf[:acked]
            self._buf_start += acked
            self.bytes_sent += acked
        probe = self._rtt.probe_off
        if probe is not None and ack_off >= probe:
            self._rtt.on_ack(ack_off, now)
        self._retries = 0
        self._dupacks = 0
        if self._cc.on_ack(max(acked, 0), ack_off, self.snd_max - ack_off, self.mss):
            self._retransmit_one(now)  # partial ACK: the next hole (RFC 6582 3.2 step 4)
        # RFC 6298 5.2/5.3: stop the timer when all is acknowledged, else restart it.
        self._rtx_deadline = None if ack_off >= self.snd_nxt else now + self.rto
        if self._send_blocked and len(self._snd_buf) <= self.config.send_buffer // 2:
            self._send_blocked = False
            self._events.append(SendSpaceAvailable(self.flow_id))

    def flush(self, now: float) -> None:
        """Send what the windows allow, then a pure ACK if one is still owed."""
        if self.state in SENDING:
            data_end = self._buf_start + len(self._snd_buf)
            wnd_end = self.snd_una + min(self.snd_wnd, self._cc.cwnd)
            seg_size = self._seg_size
            while self.snd_nxt < data_end and self.snd_nxt < wnd_end:
                n = min(seg_size, data_end - self.snd_nxt, wnd_end - self.snd_nxt)
                if n < self.mss and not self._may_send(n, data_end - self.snd_nxt):
                    break
                self.snd_nxt += self._transmit(self.snd_nxt, n)
                if self.snd_nxt > self.snd_max and self._rtt.probe_off is None:
                    self._rtt.start(self.snd_nxt, now)
            if self.fin_queued and self.snd_nxt == data_end and self.snd_nxt < wnd_end:
                self.snd_nxt += self._transmit(data_end, 0)  # the FIN waits for window too
            if self.snd_nxt > self.snd_max:
                self.snd_max = self.snd_nxt
            if self.snd_nxt > self.snd_una and self._rtx_deadline is None:
                self._rtx_deadline = now + self.rto
            self._arm_persist(now)
        if self._ack_pending and self.state is not TcpState.CLOSED:
            self._emit(self.snd_nxt, ACK)

    def _may_send(self, usable: int, queued: int) -> bool:
        """Sender silly-window avoidance (RFC 9293 3.8.6.2.1): send a full segment, all the
        queued data, or half the largest window the client offered; else wait for more
        window while data is in flight (its ACKs will come).  With nothing in flight, send
        (the override of 3.8.6.2.1 (d), without a timer)."""
        return (
            usable >= self.mss
            or usable >= queued
            or usable >= self._max_snd_wnd >> 1
            or self.snd_nxt == self.snd_una
        )

    def _transmit(self, off: int, max_len: int) -> int:
        """Send the data at `off` (up to `max_len` bytes) and our FIN if it follows and fits
        the window; return the sequence space used."""
        data_end = self._buf_start + len(self._snd_buf)
        n = min(max_len, data_end - off)
        start = off - self._buf_start
        payload = bytes(self._snd_buf[start : start + n]) if n > 0 else b""
        flags = ACK
        used = n
        if self.fin_queued and off + n == data_end and off + n < self.snd_una + self.snd_wnd:
            flags |= FIN
            used += 1
        if n and off + n == data_end:
            flags |= PSH
        self._emit(off, flags, payload)
        if n > self.mss and self.mss != self.config.mss:
            # A super-packet for a flow with a smaller MSS than the device's: tell the
            # device where to cut it.
            self._out[-1] = GsoPacket(self._out[-1], self.mss)
        return used

    def _retransmit_one(self, now: float) -> None:
        if self.snd_una < 0:
            self._send_syn_ack()
        else:
            self._transmit(self.snd_una, self.mss)
        self.retransmissions += 1
        self._rtt.cancel()  # Karn's algorithm
        self._rtx_deadline = now + self.rto

    def _maybe_advance_fin(self, ack_off: int, now: float) -> None:
        """Called after every acceptable ACK: TcpConnection moves on when it covers our FIN."""

    def _on_persist_timeout(self, now: float) -> None:
        # Zero-window probe: an ACK one byte below SND.UNA makes the client answer with its
        # current window (the form Linux uses; RFC 9293 3.8.6.1 allows either).
        self._emit(self.snd_una - 1, ACK)
        self._persist_deadline = now + self._rtt.next_persist_interval()

    def _on_retransmission_timeout(self, now: float) -> bool:
        """The RTO expired: resend (go-back-N).  True when the retransmissions are used up
        and the flow must be reset."""
        if self.snd_wnd == 0 and self.state is not TcpState.SYN_RECEIVED:
            # The client closed its window: nothing can be resent, and a client that answers
            # the persist timer's probes must be kept however long (RFC 9293 3.8.6.1,
            # MUST-26): not counted toward the retransmission limit.
            self.snd_nxt = self.snd_una
            self._rtx_deadline = None
            self._rtt.cancel()
            self._arm_persist(now)
            return False
        self._retries += 1
        limit = (
            self.config.max_syn_ack_retransmissions
            if self.state is TcpState.SYN_RECEIVED
            else self.config.max_retransmissions
        )
        if self._retries > limit:
            return True
        self._rtt.back_off()
        self._dupacks = 0
        if self.state is TcpState.SYN_RECEIVED:
            self._retransmit_one(now)
            return False
        self._cc.on_timeout(self.snd_max - self.snd_una, self.snd_max, self.mss)
        # Go back N (RFC 6298 5.4): resend from the oldest unacknowledged byte.
        self.snd_nxt = self.snd_una
        self._rtx_deadline = None
        self.retransmissions += 1
        self._rtt.cancel()  # Karn's algorithm: no sample from retransmitted data
        self.flush(now)
        return False

    def _arm_persist(self, now: float) -> None:
        """Arm the persist timer when data or our FIN waits behind a zero window and nothing
        is in flight."""
        data_end = self._buf_start + len(self._snd_buf)
        waiting = self.snd_nxt < data_end or (self.fin_queued and self.snd_nxt == data_end)
        if self.snd_wnd == 0 and waiting and self.snd_nxt == self.snd_una:
            if self._persist_deadline is None:
                self._persist_deadline = now + self._rtt.first_persist_interval()
        else:
            self._persist_deadline = None

    def _set_mss(self, mss: int) -> None:
        self.mss = mss
        segment = self.config.super_segment
        # With TSO, a whole number of MSS-sized segments, so that every one is full.
        self._seg_size = (segment // mss) * mss if segment is not None else mss

    def _send_syn_ack(self) -> None:
        options = TcpOptions(mss=self.config.mss)
        if self._window_scaling:
            options.wscale = self.rcv_wscale
        # The window in a SYN is never scaled (RFC 7323 2.2).
        self._emit(-1, SYN | ACK, b"", options.build(), unscaled=True)

    def _ack_now(self) -> None:
        self._emit(self.snd_nxt, ACK)

    def _challenge_ack(self, now: float) -> None:
        """An ACK telling a (possibly blind) sender where we are, rate-limited per flow
        (RFC 5961 7)."""
        config = self.config
        if now - self._challenge_start >= config.challenge_ack_interval:
            self._challenge_start = now
            self._challenge_count = 0
        if self._challenge_count < config.challenge_ack_limit:
            self._challenge_count += 1
            self._ack_now()

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

    def _wire_snd(self, off: int) -> int:
        return (self.iss + 1 + off) & SEQ_MASK

    def _wire_rcv(self, off: int) -> int:
        return (self.irs + 1 + off) & SEQ_MASK
