"""The session pool's sizing and ageing rules (outbound/pool_policy.py), on a stepped clock."""

from __future__ import annotations

import pytest

from tun2socks.outbound.pool_policy import (
    OPEN_HOLD_OFF_S,
    RATE_WINDOW_S,
    ROUND_TRIP_SAMPLES,
    PoolPolicy,
)


def test_without_flows_the_pool_wants_no_session_ever() -> None:
    policy = PoolPolicy(max_size=8, max_age=20.0)
    for now in (0.0, 1.0, 100.0, 10_000.0):
        assert policy.target(now) == 0
        assert policy.to_open(now, ready=0, opening=0) == 0


def test_target_is_the_flows_of_the_last_second_capped_at_the_size() -> None:
    policy = PoolPolicy(max_size=4, max_age=20.0)
    policy.flow_made(10.0)
    assert policy.target(10.0) == 1
    policy.flow_made(10.2)
    policy.flow_made(10.4)
    assert policy.target(10.5) == 3
    for step in range(10):
        policy.flow_made(10.5 + step * 0.01)
    assert policy.target(10.6) == 4  # capped
    # Once the flows stop, the target falls to zero within one window: idle means no sessions.
    assert policy.target(10.6 + RATE_WINDOW_S) == 0


def test_to_open_counts_ready_sessions_and_those_on_the_way() -> None:
    policy = PoolPolicy(max_size=8, max_age=20.0)
    for step in range(5):
        policy.flow_made(step * 0.1)
    assert policy.to_open(0.5, ready=0, opening=0) == 5
    assert policy.to_open(0.5, ready=2, opening=2) == 1
    assert policy.to_open(0.5, ready=4, opening=3) == 0


def test_a_failed_open_holds_further_opens_off_for_a_while() -> None:
    policy = PoolPolicy(max_size=8, max_age=20.0)
    policy.flow_made(1.0)
    policy.open_failed(1.0)
    policy.flow_made(1.0 + OPEN_HOLD_OFF_S / 2)
    assert policy.to_open(1.0 + OPEN_HOLD_OFF_S / 2, ready=0, opening=0) == 0
    policy.flow_made(1.0 + OPEN_HOLD_OFF_S)
    assert policy.to_open(1.0 + OPEN_HOLD_OFF_S, ready=0, opening=0) >= 1


def test_sessions_expire_at_max_age() -> None:
    policy = PoolPolicy(max_size=8, max_age=5.0)
    assert policy.expires_at(100.0) == 105.0
    assert not policy.expired(100.0, 104.9)
    assert policy.expired(100.0, 105.0)


def test_size_zero_never_opens() -> None:
    policy = PoolPolicy(max_size=0, max_age=5.0)
    policy.flow_made(1.0)
    assert policy.to_open(1.0, ready=0, opening=0) == 0


@pytest.mark.parametrize(
    ("size", "age", "round_trip"), [(-1, 1.0, 0.0), (1, 0.0, 0.0), (1, -2.0, 0.0), (1, 1.0, -1.0)]
)
def test_bad_settings_are_refused(size: int, age: float, round_trip: float) -> None:
    with pytest.raises(ValueError):
        PoolPolicy(max_size=size, max_age=age, min_round_trip=round_trip)


def _busy(policy: PoolPolicy, now: float) -> None:
    for step in range(5):
        policy.flow_made(now + step * 0.01)


def test_a_proxy_nearer_than_min_round_trip_gets_no_sessions() -> None:
    policy = PoolPolicy(max_size=8, max_age=20.0, min_round_trip=0.002)
    _busy(policy, 1.0)
    assert policy.to_open(1.1, ready=0, opening=0) == 0  # no login measured yet: wait
    policy.round_trip_seen(0.0004)
    assert policy.to_open(1.1, ready=0, opening=0) == 0


def test_a_proxy_at_least_min_round_trip_away_gets_sessions_once_measured_enough() -> None:
    policy = PoolPolicy(max_size=8, max_age=20.0, min_round_trip=0.002)
    _busy(policy, 1.0)
    for _ in range(ROUND_TRIP_SAMPLES - 1):
        policy.round_trip_seen(0.021)
        assert policy.to_open(1.1, ready=0, opening=0) == 0  # a cold start's logins are slow
    policy.round_trip_seen(0.021)
    assert policy.to_open(1.1, ready=0, opening=0) == 5


def test_a_slow_first_login_of_a_near_proxy_opens_nothing() -> None:
    policy = PoolPolicy(max_size=8, max_age=20.0, min_round_trip=0.002)
    _busy(policy, 1.0)
    policy.round_trip_seen(0.004)  # cold proxy, cold caches
    for _ in range(ROUND_TRIP_SAMPLES):
        assert policy.to_open(1.1, ready=0, opening=0) == 0
        policy.round_trip_seen(0.0001)


def test_the_smallest_round_trip_decides_so_queueing_under_load_does_not_count() -> None:
    # A near proxy measured once when idle; then every login waits in queues for 15 ms.
    policy = PoolPolicy(max_size=8, max_age=20.0, min_round_trip=0.002)
    _busy(policy, 1.0)
    policy.round_trip_seen(0.00007)
    for _ in range(1000):
        policy.round_trip_seen(0.015)
    assert policy.round_trip == 0.00007
    assert policy.to_open(1.1, ready=0, opening=0) == 0


def test_a_network_change_forgets_the_distance() -> None:
    policy = PoolPolicy(max_size=8, max_age=20.0, min_round_trip=0.002)
    _busy(policy, 1.0)
    policy.round_trip_seen(0.0001)
    policy.forget_round_trips()
    assert policy.round_trip is None
    for _ in range(ROUND_TRIP_SAMPLES):  # the new path goes far away (a VPN came up, say)
        policy.round_trip_seen(0.030)
    assert policy.to_open(1.1, ready=0, opening=0) == 5


def test_min_round_trip_zero_keeps_sessions_for_any_proxy() -> None:
    policy = PoolPolicy(max_size=8, max_age=20.0, min_round_trip=0.0)
    _busy(policy, 1.0)
    assert policy.to_open(1.1, ready=0, opening=0) == 5
