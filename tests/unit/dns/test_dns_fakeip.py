"""The fake-IP pool: allocation, reuse, LRU eviction guarded by the TTL, IPv4 and IPv6."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest

from tun2socks_dns.fakeip import FakeIpPool, PoolExhausted


def pool(prefix: str = "198.18.128.0/29", reuse_after: float = 10.0) -> FakeIpPool:
    return FakeIpPool(ip_network(prefix), reuse_after=reuse_after)


def test_addresses_are_handed_out_in_order_skipping_network_and_broadcast() -> None:
    p = pool("198.18.128.0/29")  # 8 addresses, 6 usable
    assert p.capacity == 6
    got = [p.allocate(f"n{i}.test", 0.0) for i in range(6)]
    assert got == [IPv4Address(f"198.18.128.{i}") for i in range(1, 7)]


def test_same_name_gets_the_same_address() -> None:
    p = pool()
    first = p.allocate("www.example.test", 0.0)
    assert p.allocate("WWW.Example.Test.", 5.0) == first
    assert len(p) == 1


def test_lookup_maps_back_and_only_inside_the_range() -> None:
    p = pool()
    address = p.allocate("www.example.test", 0.0)
    assert p.lookup(address, 1.0) == "www.example.test"
    assert p.lookup(IPv4Address("198.18.128.6"), 1.0) is None  # in range, never handed out
    assert p.lookup(IPv4Address("192.0.2.1"), 1.0) is None
    assert address in p
    assert IPv4Address("192.0.2.1") not in p


def test_ipv6_pool() -> None:
    p = pool("fd00:7f:f::/126", reuse_after=1.0)  # 4 addresses: ::1 to ::3 usable
    assert p.capacity == 3
    first = p.allocate("six.test", 0.0)
    assert isinstance(first, IPv6Address)
    assert first == ip_address("fd00:7f:f::1")
    assert p.lookup(first, 0.0) == "six.test"
    assert [p.allocate(f"n{i}.test", 0.0) for i in range(2)] == [
        ip_address("fd00:7f:f::2"),
        ip_address("fd00:7f:f::3"),
    ]


def test_full_pool_recycles_the_least_recently_used_mapping() -> None:
    p = pool("198.18.128.0/30", reuse_after=10.0)  # 2 usable addresses
    a = p.allocate("a.test", 0.0)
    b = p.allocate("b.test", 1.0)
    assert p.lookup(a, 2.0) == "a.test"  # a flow to a: a is now the most recent
    c = p.allocate("c.test", 20.0)
    assert c == b  # b was the least recently used
    assert p.lookup(b, 20.0) == "c.test"
    assert p.lookup(a, 21.0) == "a.test"  # c is now the least recently used
    assert p.allocate("b.test", 40.0) == c
    assert p.lookup(a, 40.0) == "a.test"


def test_recently_used_mapping_is_never_recycled() -> None:
    p = pool("198.18.128.0/30", reuse_after=10.0)
    p.allocate("a.test", 0.0)
    p.allocate("b.test", 5.0)
    with pytest.raises(PoolExhausted):
        p.allocate("c.test", 9.9)  # a was used 9.9 s ago: a client may still hold it
    assert p.allocate("c.test", 10.0) == IPv4Address("198.18.128.1")


def test_lookup_keeps_a_mapping_alive() -> None:
    p = pool("198.18.128.0/30", reuse_after=10.0)
    a = p.allocate("a.test", 0.0)
    b = p.allocate("b.test", 0.0)
    p.lookup(a, 8.0)  # a connection to a at 8 s
    assert p.allocate("c.test", 12.0) == b  # b: last used 12 s ago
    with pytest.raises(PoolExhausted):
        p.allocate("d.test", 15.0)  # a: last used 7 s ago
    assert p.allocate("d.test", 18.0) == a


def test_exhaustion_leaves_existing_mappings_intact() -> None:
    p = pool("198.18.128.0/30", reuse_after=100.0)
    a = p.allocate("a.test", 0.0)
    b = p.allocate("b.test", 0.0)
    with pytest.raises(PoolExhausted):
        p.allocate("c.test", 1.0)
    assert (p.lookup(a, 1.0), p.lookup(b, 1.0)) == ("a.test", "b.test")
    assert len(p) == 2


def test_too_small_range_is_refused() -> None:
    with pytest.raises(ValueError):
        FakeIpPool(ip_network("198.18.128.0/31"), reuse_after=1.0)
