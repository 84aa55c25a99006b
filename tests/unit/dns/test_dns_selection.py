"""Upstream selection and failover: health ordering with backoff, and one query's race."""

from __future__ import annotations

import pytest

from tun2socks_dns.selection import Outcome, Race, UpstreamHealth

# --- health ------------------------------------------------------------------------------------


def test_healthy_upstreams_keep_the_configured_order() -> None:
    assert UpstreamHealth(3).order(0.0) == [0, 1, 2]


def test_failed_upstream_moves_to_the_end_until_its_backoff_ends() -> None:
    health = UpstreamHealth(3, base_backoff=1.0, max_backoff=30.0)
    assert health.failed(0, 10.0) is True  # the first failure in a row
    assert health.order(10.5) == [1, 2, 0]
    assert health.order(11.0) == [0, 1, 2]  # back after 1 s


def test_backoff_doubles_per_failure_in_a_row_up_to_the_cap() -> None:
    health = UpstreamHealth(2, base_backoff=1.0, max_backoff=5.0)
    downtimes = []
    for _ in range(5):
        health.failed(0, 100.0)
        downtimes.append(next(t for t in range(0, 100) if not health.is_down(0, 100.0 + t)))
    assert downtimes == [1, 2, 4, 5, 5]


def test_success_makes_it_healthy_again() -> None:
    health = UpstreamHealth(2)
    health.failed(0, 0.0)
    health.failed(0, 0.0)
    assert health.succeeded(0) is True  # it had been failing
    assert health.order(0.0) == [0, 1]
    assert health.succeeded(0) is False
    assert health.failed(0, 1.0) is True  # a new run of failures starts at the base backoff
    assert health.order(1.999) == [1, 0]
    assert health.order(2.0) == [0, 1]


def test_when_all_are_down_the_soonest_back_comes_first() -> None:
    health = UpstreamHealth(3, base_backoff=1.0)
    health.failed(0, 0.0)
    health.failed(0, 0.0)  # down until 2
    health.failed(1, 0.0)  # down until 1
    health.failed(2, 0.5)  # down until 1.5
    assert health.order(0.6) == [1, 2, 0]


# --- one query's race --------------------------------------------------------------------------


def race(order: list[int], *, attempt: float = 2.0, deadline: float = 5.0) -> Race:
    return Race(order, 0.0, attempt_timeout=attempt, deadline=deadline)


def test_first_upstream_is_asked_alone_at_first() -> None:
    r = race([2, 0, 1])
    assert r.start(0.0) == [2]
    assert r.get_timer() == 2.0
    assert r.outcome is Outcome.PENDING


def test_first_good_answer_wins() -> None:
    r = race([0, 1])
    r.start(0.0)
    r.answered(0)
    assert (r.outcome, r.winner) == (Outcome.ANSWERED, 0)
    assert r.get_timer() is None
    assert r.failed(1, 1.0) == []  # too late to matter


def test_failure_starts_the_next_upstream_at_once() -> None:
    r = race([0, 1, 2])
    r.start(0.0)
    assert r.failed(0, 0.1) == [1]
    assert r.get_timer() == pytest.approx(2.1)  # the next one's own attempt timeout


def test_slow_upstream_gets_company_after_the_attempt_timeout() -> None:
    r = race([0, 1])
    r.start(0.0)
    assert r.handle_timer(1.0) == []  # early wake-up: nothing to do
    assert r.handle_timer(2.0) == [1]
    assert sorted(r.running) == [0, 1]
    assert r.get_timer() == 5.0  # nothing left to start: only the deadline
    r.answered(0)  # the slow one answered first after all
    assert r.winner == 0


def test_all_failing_ends_the_race_before_the_deadline() -> None:
    r = race([0, 1])
    r.start(0.0)
    assert r.failed(0, 0.1) == [1]
    assert r.failed(1, 0.2) == []
    assert r.outcome is Outcome.FAILED


def test_one_still_running_keeps_the_race_open() -> None:
    r = race([0, 1])
    r.start(0.0)
    r.handle_timer(2.0)
    assert r.failed(1, 2.5) == []
    assert r.outcome is Outcome.PENDING  # 0 may still answer
    r.handle_timer(5.0)
    assert r.outcome is Outcome.EXPIRED


def test_deadline_expires_the_race() -> None:
    r = race([0], attempt=2.0, deadline=5.0)
    r.start(0.0)
    assert r.get_timer() == 5.0
    assert r.handle_timer(5.0) == []
    assert r.outcome is Outcome.EXPIRED
    assert r.overdue(5.0) == [0]  # it had its full attempt time: a failure for its health


def test_attempt_started_late_is_not_overdue() -> None:
    r = race([0, 1], attempt=2.0, deadline=3.0)
    r.start(0.0)
    r.handle_timer(2.0)
    r.handle_timer(3.0)
    assert r.overdue(3.0) == [0]  # 1 ran only 1 s: not its fault


def test_empty_order_is_refused() -> None:
    with pytest.raises(ValueError):
        race([])


def test_health_and_race_together_fail_over_then_recover() -> None:
    health = UpstreamHealth(2, base_backoff=1.0)
    r = Race(health.order(0.0), 0.0, attempt_timeout=2.0, deadline=5.0)
    assert r.start(0.0) == [0]
    health.failed(0, 0.1)
    assert r.failed(0, 0.1) == [1]
    r.answered(1)
    health.succeeded(1)
    # The next query, 0.5 s later, starts with the upstream that works.
    assert Race(health.order(0.6), 0.6, attempt_timeout=2.0, deadline=5.6).start(0.6) == [1]
    # After the backoff the first upstream is tried first again.
    assert Race(health.order(1.2), 1.2, attempt_timeout=2.0, deadline=6.2).start(1.2) == [0]
