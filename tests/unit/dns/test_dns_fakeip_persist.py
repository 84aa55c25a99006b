"""Fake-IP mappings over a restart: the pool's snapshot/restore (pure, a stepped clock) and the
store that writes them to route.state_dir (a temporary directory here)."""

from __future__ import annotations

import json
import logging
import stat
from ipaddress import IPv4Address, ip_network
from pathlib import Path

import pytest

from tun2socks_dns.fakeip import FakeIpPool, PoolExhausted
from tun2socks_dns.fakeip_store import FakeIpStore, store_path


def pool(prefix: str = "198.18.128.0/29", reuse_after: float = 10.0) -> FakeIpPool:
    return FakeIpPool(ip_network(prefix), reuse_after=reuse_after)


def through_json(data: object) -> object:
    return json.loads(json.dumps(data))


def test_restored_pool_maps_the_same_addresses_to_the_same_names() -> None:
    before = pool()
    a = before.allocate("a.test", 0.0)
    b = before.allocate("b.test", 1.0)
    after = pool()
    assert after.restore(through_json(before.snapshot(5.0, 100)), 1000.0, 3.0) == 2
    assert (after.lookup(a, 1000.0), after.lookup(b, 1000.0)) == ("a.test", "b.test")
    assert after.allocate("A.test.", 1000.0) == a  # the name keeps its address
    # a new name never takes a restored address
    assert after.allocate("c.test", 1000.0) == IPv4Address("198.18.128.3")


def test_idle_time_survives_so_a_fresh_mapping_is_not_recycled_at_once() -> None:
    """A client may hold an answer until its TTL ran out: the restart must not shorten that."""
    before = pool("198.18.128.0/30", reuse_after=10.0)  # 2 usable addresses
    before.allocate("a.test", 0.0)
    before.allocate("b.test", 8.0)
    after = pool("198.18.128.0/30", reuse_after=10.0)
    # saved at t=9 (a idle 9 s, b 1 s), read 0.5 s later, at t=100 of the new run's clock
    after.restore(through_json(before.snapshot(9.0, 100)), 100.0, 0.5)
    with pytest.raises(PoolExhausted):
        after.allocate("c.test", 100.0)  # a was used 9.5 s ago: not yet
    assert after.allocate("c.test", 100.5) == IPv4Address("198.18.128.1")  # a's, 10 s idle
    assert after.lookup(IPv4Address("198.18.128.2"), 100.5) == "b.test"


def test_snapshot_keeps_the_most_recently_used_up_to_the_limit() -> None:
    before = pool()
    for index, name in enumerate(("a.test", "b.test", "c.test")):
        before.allocate(name, float(index))
    before.lookup(IPv4Address("198.18.128.1"), 5.0)  # a.test is now the most recent
    names = [entry[1] for entry in before.snapshot(6.0, 2)["mappings"]]
    assert names == ["c.test", "a.test"]  # least recent first, b.test dropped
    assert before.snapshot(6.0, 0)["mappings"] == []


def test_restore_skips_another_network_and_malformed_entries() -> None:
    before = pool()
    before.allocate("a.test", 0.0)
    data = through_json(before.snapshot(1.0, 100))
    assert pool("198.18.129.0/29").restore(data, 0.0, 0.0) == 0  # the config changed
    assert isinstance(data, dict)
    data["mappings"] += [
        [99, "far.test", 0],  # outside the network
        [0, "net.test", 0],  # the network address is never handed out
        [2, "", 0],
        [3, "neg.test", -1],
        ["4", "str.test", 0],
        [5],
        "junk",
        [1, "dup.test", 0],  # address 1 is a.test's already
    ]
    after = pool()
    assert after.restore(data, 0.0, 0.0) == 1
    assert len(after) == 1
    for junk in (None, [], {"network": "198.18.128.0/29", "mappings": "x"}):
        assert pool().restore(junk, 0.0, 0.0) == 0


def test_changes_count_new_mappings_only() -> None:
    p = pool()
    p.allocate("a.test", 0.0)
    p.allocate("a.test", 1.0)
    p.lookup(IPv4Address("198.18.128.1"), 2.0)
    assert p.changes == 1


# --- the store: one file, atomic writes -----------------------------------------------------


class Clocks:
    def __init__(self) -> None:
        self.mono = 0.0
        self.wall = 1_000_000.0


def store(path: Path, pools: list[FakeIpPool], clocks: Clocks) -> FakeIpStore:
    return FakeIpStore(path, pools, lambda: clocks.mono, lambda: clocks.wall)


def test_store_round_trip_owner_only_and_no_temporary_left(tmp_path: Path) -> None:
    path = store_path(tmp_path / "state", "tun7")
    assert path.suffix == ".fakeip"  # never taken for a device record (*.json) by `down`
    clocks = Clocks()
    v4, v6 = pool(), pool("fd00:7f:f::/120")
    v4.allocate("a.test", 0.0)
    v6.allocate("a.test", 0.0)
    store(path, [v4, v6], clocks).save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the names a user visited
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    clocks.mono, clocks.wall = 50.0, clocks.wall + 4.0
    new_v4, new_v6 = pool(), pool("fd00:7f:f::/120")
    assert store(path, [new_v4, new_v6], clocks).load() == 2
    assert new_v4.lookup(IPv4Address("198.18.128.1"), 50.0) == "a.test"
    assert new_v6.allocate("a.test", 50.0) == v6.allocate("a.test", 0.0)


def test_store_without_a_file_or_with_a_bad_one_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "t.fakeip"
    assert store(path, [pool()], Clocks()).load() == 0
    for text in ("{not json", '{"version": 99}', "[]"):
        path.write_text(text)
        with caplog.at_level(logging.WARNING):
            assert store(path, [pool()], Clocks()).load() == 0
        assert "fake-IP mappings not restored" in caplog.text
        caplog.clear()


def test_store_that_cannot_write_warns_once_and_keeps_going(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    s = store(blocker / "t.fakeip", [pool()], Clocks())  # its directory is a file
    with caplog.at_level(logging.WARNING):
        s.save()
        s.save()
    assert caplog.text.count("fake-IP mappings not saved") == 1
