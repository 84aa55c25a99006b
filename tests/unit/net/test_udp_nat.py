"""The UDP NAT table: endpoint-independent mapping, idle expiry, the cap (time is stepped)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from tun2socks.net.udp_nat import UdpNat

CLIENT = ip_address("198.18.254.1")
A = (CLIENT, 40000)
B = (CLIENT, 40001)
C = (ip_address("fd00:c8:fe::1"), 40000)


def test_one_session_per_client_endpoint_whatever_the_destination() -> None:
    # The key holds no destination: every datagram of one client socket finds one session.
    nat: UdpNat[str] = UdpNat(max_sessions=10, idle_timeout=60.0)
    assert nat.touch(A, 0.0) is None
    assert nat.add(A, "session-a", 0.0) == []
    assert nat.touch(A, 1.0) == "session-a"
    assert nat.touch(B, 1.0) is None  # another port of the same host is another endpoint
    assert nat.touch(C, 1.0) is None


def test_adding_an_existing_endpoint_is_a_bug() -> None:
    nat: UdpNat[str] = UdpNat(10, 60.0)
    nat.add(A, "a", 0.0)
    with pytest.raises(KeyError):
        nat.add(A, "again", 0.0)


def test_idle_session_expires_after_the_timeout() -> None:
    nat: UdpNat[str] = UdpNat(10, idle_timeout=60.0)
    nat.add(A, "a", 100.0)
    assert nat.deadline == 160.0
    assert nat.expire(159.9) == []
    assert nat.expire(160.0) == [(A, "a")]
    assert len(nat) == 0 and nat.deadline is None
    assert nat.expired == 1


def test_traffic_refreshes_a_session() -> None:
    nat: UdpNat[str] = UdpNat(10, idle_timeout=60.0)
    nat.add(A, "a", 0.0)
    nat.add(B, "b", 10.0)
    nat.touch(A, 50.0)  # a reply or a new datagram
    assert nat.deadline == 70.0  # B is now the least recently used
    assert nat.expire(70.0) == [(B, "b")]
    assert nat.expire(109.9) == []
    assert nat.expire(110.0) == [(A, "a")]


def test_a_full_table_evicts_the_least_recently_used_session() -> None:
    nat: UdpNat[str] = UdpNat(max_sessions=2, idle_timeout=60.0)
    nat.add(A, "a", 0.0)
    nat.add(B, "b", 1.0)
    nat.touch(A, 2.0)
    assert nat.add(C, "c", 3.0) == [(B, "b")]
    assert len(nat) == 2 and B not in nat and nat.evicted == 1
    assert nat.get(A) == "a" and nat.get(C) == "c"


def test_remove_only_the_session_that_is_still_mapped() -> None:
    nat: UdpNat[str] = UdpNat(10, 60.0)
    nat.add(A, "old", 0.0)
    nat.remove(A)
    nat.add(A, "new", 1.0)
    assert nat.remove(A, "old") is None  # a late close of the old session must not
    assert nat.get(A) == "new"  # take its successor with it
    assert nat.remove(A, "new") == "new"
    assert len(nat) == 0


def test_memory_is_bounded_by_the_cap() -> None:
    nat: UdpNat[int] = UdpNat(max_sessions=100, idle_timeout=60.0)
    for port in range(10_000):
        nat.add((CLIENT, port), port, float(port))
    assert len(nat) == 100
    assert next(key for key, _ in nat) == (CLIENT, 9900)  # the oldest left


def test_zero_sessions_is_refused() -> None:
    with pytest.raises(ValueError):
        UdpNat(0, 60.0)
