"""Which upstream to ask, and when to ask the next one; pure, no I/O, time passed in.

Theory of operation
-------------------
``UpstreamHealth`` remembers, per configured upstream, whether it failed recently. Its
``order(now)`` is the configured order with the upstreams that are "down" moved to the end
(soonest to come back first): a failing upstream is still asked when nothing better is left,
never skipped for good. Each failure in a row doubles the time it stays down (``base_backoff``
up to ``max_backoff``); one good answer makes it healthy again.

``Race`` is one query's attempts over that order. The first upstream is asked at once; the next
one is started as soon as an attempt fails, or when ``attempt_timeout`` passed without an
answer (the slow one keeps running: whichever answers well first wins). At
``deadline`` the race is lost and the client gets SERVFAIL. The driver calls ``start``,
``failed``, ``answered`` and ``handle_timer`` and launches whatever indexes they return; it
sleeps until ``get_timer()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum


@dataclass
class _Health:
    failures: int = 0  # in a row
    down_until: float = 0.0


class UpstreamHealth:
    def __init__(self, count: int, *, base_backoff: float = 1.0, max_backoff: float = 30.0):
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self._health = [_Health() for _ in range(count)]

    def __len__(self) -> int:
        return len(self._health)

    def is_down(self, index: int, now: float) -> bool:
        return now < self._health[index].down_until

    def order(self, now: float) -> list[int]:
        up = [i for i in range(len(self._health)) if not self.is_down(i, now)]
        down = [i for i in range(len(self._health)) if self.is_down(i, now)]
        down.sort(key=lambda i: self._health[i].down_until)
        return up + down

    def succeeded(self, index: int) -> bool:
        """Record a good answer; True when the upstream had been failing."""
        health = self._health[index]
        recovered = health.failures > 0
        health.failures = 0
        health.down_until = 0.0
        return recovered

    def failed(self, index: int, now: float) -> bool:
        """Record a failure; True when this is the first failure in a row."""
        health = self._health[index]
        health.failures += 1
        backoff = min(self.base_backoff * 2 ** (health.failures - 1), self.max_backoff)
        health.down_until = now + backoff
        return health.failures == 1


class Outcome(Enum):
    PENDING = "pending"
    ANSWERED = "answered"
    FAILED = "failed"  # every upstream failed before the deadline
    EXPIRED = "expired"  # the deadline passed


class Race:
    def __init__(
        self, order: Sequence[int], now: float, *, attempt_timeout: float, deadline: float
    ) -> None:
        if not order:
            raise ValueError("a race needs at least one upstream")
        self._waiting = list(order)
        self._started: dict[int, float] = {}  # running attempts and when they started
        self._next_start: float | None = None
        self.attempt_timeout = attempt_timeout
        self.deadline = deadline
        self.outcome = Outcome.PENDING
        self.winner: int | None = None

    @property
    def running(self) -> list[int]:
        return list(self._started)

    def start(self, now: float) -> list[int]:
        return self._launch(now)

    def _launch(self, now: float) -> list[int]:
        if not self._waiting or self.outcome is not Outcome.PENDING:
            self._next_start = None
            return []
        index = self._waiting.pop(0)
        self._started[index] = now
        self._next_start = now + self.attempt_timeout if self._waiting else None
        return [index]

    def answered(self, index: int) -> None:
        self._started.pop(index, None)
        if self.outcome is Outcome.PENDING:
            self.outcome = Outcome.ANSWERED
            self.winner = index

    def failed(self, index: int, now: float) -> list[int]:
        """Attempt ``index`` failed; the attempts to start now (the next one, at once)."""
        self._started.pop(index, None)
        if self.outcome is not Outcome.PENDING:
            return []
        if self._waiting:
            return self._launch(now)
        if not self._started:
            self.outcome = Outcome.FAILED
        return []

    def get_timer(self) -> float | None:
        if self.outcome is not Outcome.PENDING:
            return None
        if self._next_start is None:
            return self.deadline
        return min(self._next_start, self.deadline)

    def handle_timer(self, now: float) -> list[int]:
        if self.outcome is not Outcome.PENDING:
            return []
        if now >= self.deadline:
            self.outcome = Outcome.EXPIRED
            return []
        if self._next_start is not None and now >= self._next_start:
            return self._launch(now)
        return []

    def overdue(self, now: float) -> list[int]:
        """Attempts still running that had their full ``attempt_timeout``: count as failures."""
        return [i for i, started in self._started.items() if now - started >= self.attempt_timeout]
