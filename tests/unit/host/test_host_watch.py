"""The path lookup behind the netlink watcher (tun2socks.host.watch.best_route; pure)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from tun2socks.host.watch import RouteView, best_route

RTN_UNREACHABLE = 7


def view(dst: str, oif: int | None, gateway: str | None = None, metric: int = 0) -> RouteView:
    return RouteView(ip_network(dst), oif, gateway, metric)


def test_longest_prefix_wins_over_the_default_route() -> None:
    routes = [view("0.0.0.0/0", 2, "192.168.1.1"), view("203.0.113.0/24", 3, "10.0.0.1")]
    assert best_route(routes, ip_address("203.0.113.7")) == routes[1]
    assert best_route(routes, ip_address("198.51.100.1")) == routes[0]


def test_among_equal_prefixes_the_lowest_metric_wins() -> None:
    """Two uplinks, each with a default route (RFC 4191-style preference by metric)."""
    routes = [view("0.0.0.0/0", 2, "192.168.1.1", 600), view("0.0.0.0/0", 3, "10.0.0.1", 100)]
    assert best_route(routes, ip_address("198.51.100.1")) == routes[1]


def test_on_link_route_has_no_gateway() -> None:
    routes = [view("0.0.0.0/0", 2, "192.168.1.1"), view("192.168.1.0/24", 2)]
    found = best_route(routes, ip_address("192.168.1.9"))
    assert found is not None and (found.oif, found.gateway) == (2, None)


def test_no_match_other_family_or_unreachable_gives_none() -> None:
    routes = [
        view("192.168.1.0/24", 2),
        view("::/0", 2, "fe80::1"),
        RouteView(ip_network("198.51.100.0/24"), None, None, 0, RTN_UNREACHABLE),
    ]
    assert best_route(routes, ip_address("203.0.113.7")) is None
    assert best_route(routes, ip_address("198.51.100.1")) is None
    found = best_route(routes, ip_address("2001:db8::1"))
    assert found is not None and found.gateway == "fe80::1"
