"""How many logged-in sessions to keep ready for one proxy, and for how long; sans-IO.

Theory of operation: every new flow through the proxy is reported with ``flow_made(now)``.
The target size is the number of flows made in the last ``RATE_WINDOW_S`` seconds, capped at
``max_size``: a steady trickle keeps one session ready, a burst as many as it used, and a
proxy nobody uses none at all. Sessions are only ever opened right after a flow was made
(``to_open``), so an idle tun2socks opens nothing; ready sessions that wait longer than
``max_age`` are closed (``expired``), before the proxy's own negotiation timeout closes them
(Dante: ``timeout.negotiate``, 30 s by default). After a session could not be opened the
pool holds off for ``OPEN_HOLD_OFF_S`` so that a proxy that is down is not asked twice per
flow; the flows themselves still dial it and report why it fails.

A ready session saves a flow the connect and login to the proxy, and costs a second login
message, a watched socket, a task and a timer. For a proxy on the same host or LAN the saving
is small and the cost is not: on the bench's local danted (A/B in one bed, pool forced on
against off, interleaved) a new connection's time to connect was 0.1-1 ms shorter with it
when idle, but 2,000 connections 100 at a time ran 4-15% slower by run, at 4-10% more CPU.
So the pool only works for a proxy that is at least ``min_round_trip`` away: every
login reports its round trip (greeting out, method selection in: ``round_trip_seen``), and the
smallest since the last change of network (``forget_round_trips``, on each path change)
decides. The smallest, because queues only ever add to a round trip, and under load they add
a lot: 2,000 connections 100 at a time through the local danted took 15 ms for every one of
16 logins in a row, where the idle round trip is 0.07 ms. Until ``ROUND_TRIP_SAMPLES``
logins were measured the pool waits: the first ones after a start are slow too (a cold
proxy and a cold tun2socks took more than 2 ms for a login that then took 0.1).

Time is an argument (seconds on any monotonic clock), so tests step it.
"""

from __future__ import annotations

from collections import deque

RATE_WINDOW_S = 1.0
OPEN_HOLD_OFF_S = 1.0
ROUND_TRIP_SAMPLES = 4


class PoolPolicy:
    """The sizing and ageing rules of one proxy's session pool."""

    def __init__(self, max_size: int, max_age: float, min_round_trip: float = 0.0) -> None:
        if max_size < 0:
            raise ValueError(f"pool size must be >= 0, got {max_size}")
        if max_age <= 0:
            raise ValueError(f"pool max age must be > 0, got {max_age}")
        if min_round_trip < 0:
            raise ValueError(f"pool min round trip must be >= 0, got {min_round_trip}")
        self.max_size = max_size
        self.max_age = max_age
        self.min_round_trip = min_round_trip
        self.round_trip: float | None = None  # the smallest login round trip, None before one
        self._round_trip_samples = 0
        # Only the newest max_size flows matter: the target never exceeds that many.
        self._flows: deque[float] = deque(maxlen=max(max_size, 1))
        self._hold_off_until = float("-inf")

    def flow_made(self, now: float) -> None:
        self._flows.append(now)

    def round_trip_seen(self, seconds: float) -> None:
        """A login's round trip to the proxy (greeting sent to method selection received)."""
        self._round_trip_samples += 1
        if self.round_trip is None or seconds < self.round_trip:
            self.round_trip = seconds

    def forget_round_trips(self) -> None:
        """The network changed: the proxy may be nearer or farther now."""
        self.round_trip = None
        self._round_trip_samples = 0

    @property
    def far_enough(self) -> bool:
        """Whether the proxy is far enough away for ready sessions to pay for themselves."""
        if self.min_round_trip == 0:
            return True
        round_trip = self.round_trip
        return (
            round_trip is not None
            and self._round_trip_samples >= ROUND_TRIP_SAMPLES
            and round_trip >= self.min_round_trip
        )

    def target(self, now: float) -> int:
        """Sessions worth keeping ready: flows made in the last window, at most max_size;
        none for a proxy nearer than min_round_trip."""
        if self.max_size == 0 or not self.far_enough:
            return 0
        since = now - RATE_WINDOW_S
        return sum(1 for t in self._flows if t > since)

    def to_open(self, now: float, ready: int, opening: int) -> int:
        """How many sessions to start opening now, given those ready and those on the way."""
        if now < self._hold_off_until:
            return 0
        return max(0, self.target(now) - ready - opening)

    def open_failed(self, now: float) -> None:
        self._hold_off_until = now + OPEN_HOLD_OFF_S

    def expires_at(self, opened_at: float) -> float:
        return opened_at + self.max_age

    def expired(self, opened_at: float, now: float) -> bool:
        return now >= self.expires_at(opened_at)
