"""Congestion control toward the client (sans-IO): RFC 5681 with NewReno recovery (RFC 6582).

The path from the TUN to a client is usually the local kernel, but it can drop: the per-CPU
backlog, a full TUN queue, a narrower link behind a bridge.  Without a congestion window
every timeout would resend a whole send buffer into the queue that just overflowed.

Windows are in bytes and acknowledged bytes are counted (RFC 3465), so a super-packet cut
by the kernel (TSO) or a stretch ACK from a client with GRO counts for what it carries.
Like Linux, slow start counts every acknowledged byte (no RFC 3465 limit L): on the local
link stretch ACKs are the rule, and the limit would make slow start crawl.

The connection calls `on_ack` for each ACK of new data, `on_dupack` for each duplicate
ACK and `on_timeout` when the retransmission timer expires; it sends at most
`SND.UNA + min(SND.WND, cwnd)`.  Offsets are the connection's stream offsets.
"""

from __future__ import annotations

NO_THRESHOLD = 1 << 62  # ssthresh starts "arbitrarily high" (RFC 5681 3.1)
DUPACK_THRESHOLD = 3  # RFC 5681 3.2


def initial_window(mss: int) -> int:
    """RFC 6928: min(10 * MSS, max(2 * MSS, 14600))."""
    return min(10 * mss, max(2 * mss, 14600))


class NewReno:
    """The congestion window of one connection and its NewReno fast-recovery state."""

    __slots__ = ("_acked", "cwnd", "in_recovery", "recover", "ssthresh")

    def __init__(self, mss: int) -> None:
        self.cwnd = initial_window(mss)
        self.ssthresh = NO_THRESHOLD
        # RFC 6582 3.2 step 1: `recover` starts at the initial send sequence (our SYN, -1).
        self.recover = -1
        self.in_recovery = False
        self._acked = 0  # bytes acknowledged toward the next increase in congestion avoidance

    def on_ack(self, acked: int, ack_off: int, flight: int, mss: int) -> bool:
        """New data acknowledged (`acked` bytes, up to `ack_off`; `flight` bytes still out
        after it).  True for a partial ACK in recovery: retransmit the next hole."""
        if self.in_recovery:
            if ack_off >= self.recover:
                # Full ACK (RFC 6582 3.2 step 3, option 1): deflate the window.
                self.in_recovery = False
                self.cwnd = min(self.ssthresh, max(flight, mss) + mss)
                return False
            # Partial ACK (step 4): deflate by what it acknowledged, add back one segment.
            self.cwnd = max(self.cwnd - acked + (mss if acked >= mss else 0), mss)
            return True
        if self.cwnd < self.ssthresh:
            # Slow start (RFC 5681 3.1, counting bytes), up to ssthresh; the rest of the ACK
            # counts toward congestion avoidance (as Linux's tcp_slow_start).
            grow = min(acked, self.ssthresh - self.cwnd)
            self.cwnd += grow
            acked -= grow
        if acked:
            self._acked += acked  # congestion avoidance: one MSS per window acknowledged
            if self._acked >= self.cwnd:
                self._acked -= self.cwnd
                self.cwnd += mss
        return False

    def on_dupack(self, count: int, ack_off: int, flight: int, snd_max: int, mss: int) -> bool:
        """The `count`-th duplicate ACK in a row.  True: fast retransmit now."""
        if self.in_recovery:
            self.cwnd += mss  # RFC 5681 3.2 step 4: each dupack means a segment left
            return False
        if count != DUPACK_THRESHOLD:
            return False
        # RFC 6582 3.2 step 2: only if the ACK covers more than `recover`, so that losses in
        # one window (or resent after a timeout) do not halve the window twice.
        if ack_off < self.recover:
            return False
        self.ssthresh = max(flight // 2, 2 * mss)
        self.cwnd = self.ssthresh + DUPACK_THRESHOLD * mss
        self.recover = snd_max
        self.in_recovery = True
        return True

    def on_timeout(self, flight: int, snd_max: int, mss: int) -> None:
        """RFC 5681 3.1 equation 4 and 3.5: one segment, then slow start to half the flight."""
        self.ssthresh = max(flight // 2, 2 * mss)
        self.cwnd = mss
        self._acked = 0
        self.recover = snd_max  # RFC 6582 3.2 step 4 note: after a timeout
        self.in_recovery = False
