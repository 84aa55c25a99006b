"""Following the uplink (issue 15, build 2): the default interface for bind_interface auto,
the path summary that decides when shared connections reopen, the proxy host routes that
follow a host name's new addresses, and the excluded prefixes put back
(tun2socks.host.uplink, tun2socks.host.watch.ProxyRouteKeeper, tun2socks.path_watch).

The kernel's answers come from `Netlink`, a table in memory that answers the few pyroute2
calls these parts make (get_routes, get_links, get_addr, route) as the kernel would."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from tun2socks.host.state import StateFile
from tun2socks.host.uplink import DefaultInterface, default_route, summarize
from tun2socks.host.watch import ProxyRouteKeeper, RouteView
from tun2socks.outbound.direct import protector
from tun2socks.path_watch import PathWatch

TABLE = 7280
ETH0, WLAN0, TUN = 2, 3, 9


class Message(dict[str, Any]):
    """A netlink message: fields by key, attributes by get_attr."""

    def __init__(self, fields: dict[str, Any], attrs: dict[str, Any]) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


class Netlink:
    def __init__(self) -> None:
        self.links = {ETH0: "eth0", WLAN0: "wlan0", TUN: "tun0"}
        self.main: list[tuple[int, str, int | None, str | None, int]] = []  # family, dst, ...
        self.tables: dict[int, list[dict[str, Any]]] = {TABLE: []}
        self.addresses = [(ETH0, "192.168.1.5"), (WLAN0, "10.0.0.5")]
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def default(self, oif: int, gateway: str, metric: int = 0, family: int = 2) -> None:
        dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
        self.main.append((family, dst, oif, gateway, metric))

    def get_routes(self, family: int, table: int) -> list[Message]:
        if table != 254:
            return [
                Message(
                    {"dst_len": int(r["dst"].split("/")[1])}, {"RTA_DST": r["dst"].split("/")[0]}
                )
                for r in self.tables[table]
                if r["family"] == family
            ]
        found = []
        for fam, dst, oif, gateway, metric in self.main:
            if fam == family:
                net = ip_network(dst)
                attrs = {"RTA_OIF": oif, "RTA_GATEWAY": gateway, "RTA_PRIORITY": metric}
                if net.prefixlen:
                    attrs["RTA_DST"] = str(net.network_address)
                found.append(Message({"dst_len": net.prefixlen, "type": 1}, attrs))
        return found

    def get_links(self) -> list[Message]:
        return [
            Message({"index": i, "flags": 1}, {"IFLA_IFNAME": n, "IFLA_OPERSTATE": "UP"})
            for i, n in self.links.items()
        ]

    def get_addr(self) -> list[Message]:
        return [Message({"index": i}, {"IFA_LOCAL": a}) for i, a in self.addresses]

    def route(self, verb: str, **args: Any) -> None:
        self.calls.append((verb, args))
        routes = self.tables[args["table"]]
        routes[:] = [r for r in routes if r["dst"] != args["dst"]]
        if verb == "replace":
            routes.append(dict(args))


# --- the default interface (route.bind_interface: auto) ------------------------------------


def view(dst: str, oif: int, metric: int = 0, kind: int = 1) -> RouteView:
    return RouteView(ip_network(dst), oif, "192.0.2.1", metric, kind)


def test_default_route_is_the_lowest_metric_unicast_default_never_the_tun() -> None:
    routes = [
        view("0.0.0.0/0", TUN, metric=0),  # another program's route into the TUN
        view("0.0.0.0/0", WLAN0, metric=600),
        view("0.0.0.0/0", ETH0, metric=100),
        view("192.168.1.0/24", ETH0),
        view("0.0.0.0/0", ETH0, metric=1, kind=7),  # unreachable
    ]
    found = default_route(routes, skip_oif=TUN)
    assert found is not None and found.oif == ETH0


def test_default_interface_follows_the_default_route_per_family() -> None:
    netlink = Netlink()
    netlink.default(ETH0, "192.168.1.1")
    follow = DefaultInterface(skip_device="tun0")
    assert follow.refresh(netlink) is True
    assert follow.name(socket.AF_INET) == "eth0"
    assert follow.name(socket.AF_INET6) == "eth0"  # no IPv6 default: IPv4's uplink
    netlink.main = []
    netlink.default(WLAN0, "10.0.0.1")
    netlink.default(ETH0, "fe80::1", family=socket.AF_INET6)
    assert follow.refresh(netlink) is True and follow.refresh(netlink) is False
    assert (follow.name(socket.AF_INET), follow.name(socket.AF_INET6)) == ("wlan0", "eth0")
    assert follow.describe() == "IPv4 wlan0, IPv6 eth0"
    netlink.main = []
    follow.refresh(netlink)
    assert follow.name(socket.AF_INET) is None


def test_bind_interface_auto_asks_for_the_interface_at_each_socket() -> None:
    asked: list[int] = []

    def current(family: int) -> str | None:
        asked.append(family)
        return None  # no default route at the moment

    protect = protector(0, "auto", current)
    assert protect is not None
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            with pytest.raises(OSError) as info:
                protect(sock)
            assert info.value.errno == errno.ENETUNREACH
    assert asked == [socket.AF_INET, socket.AF_INET6]
    with pytest.raises(ValueError):
        protector(0, "auto")  # auto without a way to know the interface is a wiring error


# --- the path summary and the reopen callbacks ----------------------------------------------


class NoFlows:
    def __init__(self) -> None:
        self.relays: dict[int, Any] = {}

    def schedule_flush(self) -> None:
        raise AssertionError("no flow to reset")


def test_path_summary_changes_with_the_default_route_or_the_addresses_only() -> None:
    netlink = Netlink()
    netlink.default(ETH0, "192.168.1.1")
    first = summarize(netlink)
    netlink.tables[TABLE].append({"family": 2, "dst": "203.0.113.7/32", "table": TABLE})
    assert summarize(netlink) == first  # our own routes elsewhere: no change of path
    netlink.main = []
    netlink.default(WLAN0, "10.0.0.1")
    assert summarize(netlink) != first
    netlink.main = []
    netlink.default(ETH0, "192.168.1.1")
    netlink.addresses = [(ETH0, "192.168.1.6")]
    assert summarize(netlink) != first


def test_a_default_route_into_the_tun_is_no_change_of_path() -> None:
    # The routes that send traffic into the TUN (route.auto's, or a test bed's default route)
    # come right after start: reopening every association for them was churn for nothing.
    netlink = Netlink()
    netlink.default(ETH0, "192.168.1.1", metric=100)
    first = summarize(netlink, skip_device="tun0")
    netlink.default(TUN, "198.18.254.2", metric=0)
    assert summarize(netlink, skip_device="tun0") == first
    assert summarize(netlink) != first  # without the TUN's name it would count


def test_reopen_callbacks_run_when_the_path_moved_not_at_start_or_without_a_move() -> None:
    async def main() -> list[str]:
        reopened: list[str] = []
        loop = asyncio.get_running_loop()
        watch = PathWatch(NoFlows(), loop, reopen=[lambda: reopened.append("udp")])
        netlink = Netlink()
        netlink.default(ETH0, "192.168.1.1")
        watch._changed(netlink)  # the first look, at start
        watch._changed(netlink)  # a burst that changed nothing of the path
        await asyncio.sleep(0)
        assert reopened == []
        netlink.main = []
        netlink.default(WLAN0, "10.0.0.1")
        watch._changed(netlink)
        await asyncio.sleep(0)
        return reopened

    assert asyncio.run(main()) == ["udp"]


# --- the proxy's host routes: names followed, excluded prefixes kept -----------------------


def keeper_with(tmp_path: Path, netlink: Netlink, resolve: Callable[[str], list[str]]) -> Any:
    state = StateFile(tmp_path, "tun0")
    route = {"family": 2, "dst": "203.0.113.7/32", "oif": ETH0, "table": TABLE}
    route["gateway"] = "192.168.1.1"
    throw = {"family": 2, "dst": "192.168.0.0/16", "type": "throw", "table": TABLE}
    for args in (route, throw):
        state.record({"kind": "route", "args": args})
        netlink.tables[TABLE].append(dict(args))
    keeper = ProxyRouteKeeper(
        state,
        [{"kind": "route", "args": route}],
        kept=[{"kind": "route", "args": throw}],
        names={"proxy.example": ["203.0.113.7"]},
        table=TABLE,
        families=[socket.AF_INET],
        resolve=resolve,
    )
    return state, keeper


def test_a_proxy_name_with_a_new_address_moves_its_host_route(tmp_path: Path) -> None:
    netlink = Netlink()
    netlink.default(ETH0, "192.168.1.1")
    resolved = {"proxy.example": ["203.0.113.7"]}
    state, keeper = keeper_with(tmp_path, netlink, lambda name: resolved[name])
    assert keeper.refresh(netlink) == 0  # nothing moved
    resolved["proxy.example"] = ["203.0.113.9", "2001:db8::9"]  # IPv6 is not captured here
    assert keeper.refresh(netlink) == 1
    dsts = [r["dst"] for r in netlink.tables[TABLE]]
    assert "203.0.113.9/32" in dsts and "203.0.113.7/32" not in dsts
    recorded = [c["args"]["dst"] for c in state.changes]
    assert "203.0.113.9/32" in recorded and "203.0.113.7/32" not in recorded
    new = next(r for r in netlink.tables[TABLE] if r["dst"] == "203.0.113.9/32")
    assert (new["oif"], new["gateway"]) == (ETH0, "192.168.1.1")


def test_an_unresolvable_proxy_name_keeps_its_routes(tmp_path: Path) -> None:
    netlink = Netlink()
    netlink.default(ETH0, "192.168.1.1")

    def fails(name: str) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    _, keeper = keeper_with(tmp_path, netlink, fails)
    keeper.refresh(netlink)
    assert "203.0.113.7/32" in [r["dst"] for r in netlink.tables[TABLE]]


def test_an_excluded_prefix_that_was_removed_is_put_back(tmp_path: Path) -> None:
    netlink = Netlink()
    netlink.default(ETH0, "192.168.1.1")
    _, keeper = keeper_with(tmp_path, netlink, lambda name: ["203.0.113.7"])
    netlink.tables[TABLE] = [r for r in netlink.tables[TABLE] if r.get("type") != "throw"]
    keeper.refresh(netlink)
    throws = [r for r in netlink.tables[TABLE] if r.get("type") == "throw"]
    assert [r["dst"] for r in throws] == ["192.168.0.0/16"]
