"""The proxy reachability bookkeeping (tun2socks.outbound.reachability.ReachabilityState; pure):
which probe results are changes worth a log line, and the probe backoff."""

from __future__ import annotations

from tun2socks.outbound.reachability import (
    PROBE_MAX_S,
    PROBE_MIN_S,
    Change,
    ReachabilityState,
)


def test_first_result_is_a_change_either_way() -> None:
    assert ReachabilityState().record(True) is Change.FIRST_REACHABLE
    assert ReachabilityState().record(False) is Change.FIRST_UNREACHABLE


def test_only_transitions_are_changes_after_the_first() -> None:
    state = ReachabilityState()
    results = [False, False, True, True, False, False, True]
    changes = [state.record(reachable) for reachable in results]
    assert changes == [
        Change.FIRST_UNREACHABLE,
        None,
        Change.REACHABLE_AGAIN,
        None,
        Change.WENT_AWAY,
        None,
        Change.REACHABLE_AGAIN,
    ]
    assert state.stats() == {"reachable": 1, "probes": 7, "changes": 3}


def test_backoff_doubles_from_one_second_to_the_bound_while_unreachable() -> None:
    assert (PROBE_MIN_S, PROBE_MAX_S) == (1.0, 30.0)
    state = ReachabilityState()
    delays = []
    for _ in range(8):
        state.record(False)
        delays.append(state.next_delay())
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_reachable_proxy_is_checked_at_the_bound_and_a_loss_restarts_the_backoff() -> None:
    state = ReachabilityState()
    for _ in range(5):
        state.record(False)
    state.record(True)
    assert state.next_delay() == PROBE_MAX_S
    state.record(False)
    assert state.next_delay() == PROBE_MIN_S  # just went away: look again soon
