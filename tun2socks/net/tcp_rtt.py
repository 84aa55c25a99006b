"""Retransmission timing of one TCP connection (sans-IO): RTT estimate, RTO, persist backoff.

The RTO follows RFC 6298: SRTT and RTTVAR from one timed segment per round trip (Karn's
algorithm: never from a retransmitted one), clamped to [rto_min, rto_max], doubled on each
expiry (5.5).  The persist timer (RFC 9293 3.8.6.1) probes a zero window at intervals that
start at the RTO and double up to `persist_max`.  Time is always an argument.
"""

from __future__ import annotations


class RttEstimator:
    """RFC 6298 state of one connection; `rto` is the current retransmission timeout."""

    __slots__ = (
        "_max",
        "_min",
        "_persist_max",
        "_probe_at",
        "_rttvar",
        "_srtt",
        "persist_backoff",
        "probe_off",
        "rto",
    )

    def __init__(self, initial: float, minimum: float, maximum: float, persist_max: float):
        self.rto = initial  # RFC 6298 2.1
        self._min = minimum
        self._max = maximum
        self._persist_max = persist_max
        self._srtt: float | None = None
        self._rttvar = 0.0
        # The offset whose acknowledgment ends the running sample, or None: public so that the
        # hot path can test it without a call.
        self.probe_off: int | None = None
        self._probe_at = 0.0
        self.persist_backoff = 0

    def start(self, ack_off: int, now: float) -> None:
        """Time the segment that `ack_off` acknowledges (one sample per round trip)."""
        self.probe_off = ack_off
        self._probe_at = now

    def cancel(self) -> None:
        """Karn's algorithm: a retransmission makes the running sample ambiguous."""
        self.probe_off = None

    def on_ack(self, ack_off: int, now: float) -> None:
        """An acknowledgment up to `ack_off` arrived: take the sample if it covers the probe."""
        if self.probe_off is not None and ack_off >= self.probe_off:
            self.probe_off = None
            self.sample(now - self._probe_at)

    def sample(self, rtt: float) -> None:
        """RFC 6298 2.2 and 2.3."""
        if self._srtt is None:
            self._srtt = rtt
            self._rttvar = rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self.rto = min(max(self._srtt + max(0.001, 4 * self._rttvar), self._min), self._max)

    def back_off(self) -> None:
        """RFC 6298 5.5: double the RTO after an expiry."""
        self.rto = min(self.rto * 2, self._max)

    def first_persist_interval(self) -> float:
        self.persist_backoff = 0
        return max(self.rto, self._min)

    def next_persist_interval(self) -> float:
        """The wait after a zero-window probe: exponential backoff, capped."""
        self.persist_backoff += 1
        return min(self.rto * (1 << min(self.persist_backoff, 10)), self._persist_max)
