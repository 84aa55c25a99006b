"""The table behind ``proxy.early_accept``: which destinations count as known, for how long,
and how many are kept. Pure: a stepped clock, no I/O."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from tun2socks.outbound.known_destinations import KnownDestinations

WEB = (ip_address("192.0.2.80"), 80)
TLS = (ip_address("192.0.2.80"), 443)


def test_an_unseen_destination_is_not_known() -> None:
    table = KnownDestinations(ttl=60.0)
    assert not table.is_known(WEB, 0.0)


def test_a_destination_is_known_for_ttl_seconds_after_it_connected() -> None:
    table = KnownDestinations(ttl=60.0)
    table.connected(WEB, 100.0)
    assert table.is_known(WEB, 100.0)
    assert table.is_known(WEB, 159.9)
    assert not table.is_known(WEB, 160.0)  # stale: forgotten, not only hidden
    assert len(table) == 0


def test_the_port_is_part_of_the_destination() -> None:
    table = KnownDestinations(ttl=60.0)
    table.connected(WEB, 0.0)
    assert not table.is_known(TLS, 1.0)


def test_each_connect_restarts_the_ttl() -> None:
    table = KnownDestinations(ttl=60.0)
    table.connected(WEB, 0.0)
    table.connected(WEB, 50.0)
    assert table.is_known(WEB, 100.0)
    assert not table.is_known(WEB, 110.0)


def test_a_failed_dial_makes_the_destination_unknown() -> None:
    table = KnownDestinations(ttl=60.0)
    table.connected(WEB, 0.0)
    table.failed(WEB)
    table.failed(TLS)  # never known: nothing to do
    assert not table.is_known(WEB, 1.0)


def test_the_table_is_bounded_and_drops_the_least_recently_connected() -> None:
    table = KnownDestinations(ttl=60.0, capacity=3)
    destinations = [(ip_address(f"192.0.2.{n}"), 80) for n in range(1, 5)]
    for when, destination in enumerate(destinations[:3]):
        table.connected(destination, float(when))
    table.connected(destinations[0], 3.0)  # connected again: the most recent now
    table.connected(destinations[3], 4.0)  # a fourth: the oldest (the second) goes
    assert len(table) == 3
    assert not table.is_known(destinations[1], 5.0)
    assert all(table.is_known(d, 5.0) for d in (destinations[0], destinations[2], destinations[3]))


def test_stats_show_the_size_and_the_counters() -> None:
    table = KnownDestinations(ttl=60.0)
    table.connected(WEB, 0.0)
    table.counters.accepted += 2
    table.counters.reset += 1
    assert table.stats() == {
        "known": 1,
        "accepted": 2,
        "reset": 1,
        "pipelined": 0,
        "pipelined_first_data": 0,
        "pipelined_redialed": 0,
    }


@pytest.mark.parametrize(("ttl", "capacity"), [(0.0, 10), (-1.0, 10), (60.0, 0)])
def test_a_table_that_could_hold_nothing_is_refused(ttl: float, capacity: int) -> None:
    with pytest.raises(ValueError):
        KnownDestinations(ttl=ttl, capacity=capacity)
