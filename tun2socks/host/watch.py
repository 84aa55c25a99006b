"""Network changes while running: keep the proxy's host routes on the path the host has now.

Theory of operation
-------------------
With ``route.auto`` and no protected sockets (the host-route way, see routes.py), each proxy
address gets a host route in ``route.table`` by the path it had at start. When the uplink
changes (the default route moves to another gateway or interface, a link goes down and its
routes with it, an address changes) that route is stale: proxy connections would keep to
the old gateway, or, once the kernel dropped the route with its link, fall into the TUN's
default route and loop. A thread listens to netlink (links, addresses, IPv4 and IPv6 routes)
and, a moment after each burst of changes, looks the proxy up in the main table again (the
table our rules leave alone) and replaces a host route whose path differs, journalled in the
state file like every other change, so that ``tun2socks down`` after a SIGKILL still undoes
exactly what is there. Sockets marked with ``route.mark`` need none of this: they use the
main table as it is at each connect.

The lookup is done here (``best_route``, pure) rather than with ``ip route get``: the kernel
would answer through our own rules and return the stale host route itself.

A proxy given by host name is resolved again after each change (the new network may have
another resolver, or the name another address): an address it did not have gets a host route
by its path, one it lost loses its route. And the routes route.auto made that belong to no
path (the excluded prefixes' throw routes) are put back if something removed them.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)

from tun2socks.host.state import Change, StateFile

log = logging.getLogger(__name__)

RTN_UNICAST = 1
MAIN_TABLE = 254
SETTLE_S = 0.2  # changes come in bursts (link down: addresses, then routes): act once
POLL_S = 0.5  # how often the thread looks at its stop flag
GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
)


@dataclass(frozen=True)
class RouteView:
    """One route of the main table, as far as path selection cares."""

    dst: IPv4Network | IPv6Network
    oif: int | None
    gateway: str | None
    metric: int
    type: int = RTN_UNICAST


def best_route(routes: Sequence[RouteView], address: IPv4Address | IPv6Address) -> RouteView | None:
    """The route the main table takes to `address`: the longest matching prefix, then the
    lowest metric; None when only non-unicast routes (unreachable, ...) or none match."""
    matching = [r for r in routes if r.dst.version == address.version and address in r.dst]
    if not matching:
        return None
    best = max(matching, key=lambda r: (r.dst.prefixlen, -r.metric))
    return best if best.type == RTN_UNICAST and best.oif is not None else None


def main_routes(ipr: Any, family: int) -> list[RouteView]:
    views = []
    for msg in ipr.get_routes(family=family, table=MAIN_TABLE):
        dst = msg.get_attr("RTA_DST")
        prefix = ip_network(f"{dst or ('::' if family == 10 else '0.0.0.0')}/{msg['dst_len']}")
        views.append(
            RouteView(
                dst=prefix,
                oif=msg.get_attr("RTA_OIF"),
                gateway=msg.get_attr("RTA_GATEWAY"),
                metric=msg.get_attr("RTA_PRIORITY") or 0,
                type=msg["type"],
            )
        )
    return views


Resolve = Callable[[str], list[str]]  # a host name -> its addresses (getaddrinfo)


def resolve_name(host: str) -> list[str]:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in infos))


class ProxyRouteKeeper:
    """The host routes of the proxies, moved to the main table's current path on demand."""

    def __init__(
        self,
        state: StateFile,
        routes: Sequence[Change],
        *,
        kept: Sequence[Change] = (),
        names: dict[str, list[str]] | None = None,
        fixed: Sequence[str] = (),
        table: int = 0,
        families: Sequence[int] = (socket.AF_INET,),
        resolve: Resolve = resolve_name,
    ) -> None:
        self.state = state
        self.routes = list(routes)  # as recorded: {"kind": "route", "args": {...}}
        self.kept = list(kept)  # routes of no path (throw routes): put back when gone
        self.names = dict(names or {})  # proxy host name -> the addresses it had
        self.fixed = {str(ip_address(a)) for a in fixed}  # proxies given by address
        self.table = table
        self.families = list(families)
        self.resolve = resolve

    def refresh(self, ipr: Any) -> int:
        """Put back kept routes, follow the names, and replace each host route whose path
        changed; how many host routes were replaced or added."""
        for change in self.kept:
            if not _present(ipr, change["args"]):
                log.warning("network changed: putting back %s", change["args"]["dst"])
                try:
                    ipr.route("replace", **change["args"])
                except NetlinkError as exc:
                    log.warning("cannot put back the route %s: %s", change["args"]["dst"], exc)
        replaced = self._follow_paths(ipr)  # first: a resolver may be slow to answer
        if self._follow_names(ipr):
            replaced += self._follow_paths(ipr)
        return replaced

    def _follow_names(self, ipr: Any) -> bool:
        """Resolve the names again; True when their addresses changed."""
        changed = False
        for name, had in self.names.items():
            try:
                now = [a for a in self.resolve(name) if _family(a) in self.families]
            except OSError as exc:
                log.info(
                    "cannot resolve the proxy host %s again: %s; keeping its routes", name, exc
                )
                continue
            if not now or now == had:
                continue
            log.warning("network changed: proxy host %s is now %s", name, ", ".join(now))
            self.names[name] = now
            changed = True
            wanted = self.fixed | {a for addresses in self.names.values() for a in addresses}
            for address in set(had) - wanted:
                self._drop_route(ipr, address)
            known = {ip_network(c["args"]["dst"]).network_address for c in self.routes}
            for address in now:
                if ip_address(address) not in known:
                    dst = f"{address}/{ip_address(address).max_prefixlen}"
                    args = {"family": _family(address), "dst": dst, "table": self.table}
                    self.routes.append({"kind": "route", "args": args})  # its path: next
        return changed

    def _drop_route(self, ipr: Any, address: str) -> None:
        for change in list(self.routes):
            if ip_network(change["args"]["dst"]).network_address != ip_address(address):
                continue
            self.routes.remove(change)
            if "oif" not in change["args"]:
                continue  # never made
            try:
                ipr.route("del", **change["args"])
            except NetlinkError as exc:
                log.info("the old proxy route %s was gone already: %s", address, exc)
            if change in self.state.changes:
                self.state.forget(change)

    def _follow_paths(self, ipr: Any) -> int:
        replaced = 0
        for index, old in enumerate(list(self.routes)):
            args = old["args"]
            address = ip_network(args["dst"]).network_address
            path = best_route(main_routes(ipr, args["family"]), address)
            if path is None:
                continue  # no way to the proxy at the moment: nothing better to point at
            new_args = {k: v for k, v in args.items() if k != "gateway"}
            new_args["oif"] = path.oif
            if path.gateway:
                new_args["gateway"] = path.gateway
            if new_args == args and _present(ipr, args):
                continue
            new: Change = {"kind": "route", "args": new_args}
            if new != old:
                self.state.record(new)  # before the change, as always
            try:
                ipr.route("replace", **new_args)
            except NetlinkError as exc:
                log.warning("cannot move the proxy route %s: %s", args["dst"], exc)
                if new != old:
                    self.state.forget(new)
                continue
            if new != old:
                if old in self.state.changes:  # a new address of a name was never recorded
                    self.state.forget(old)  # replaced: undoing `new` removes what is there
                self.routes[index] = new
            via = f" via {path.gateway}" if path.gateway else ""
            log.warning("network changed: proxy %s now%s dev #%s", args["dst"], via, path.oif)
            replaced += 1
        return replaced


def _family(address: str) -> int:
    return socket.AF_INET6 if ip_address(address).version == 6 else socket.AF_INET


def _present(ipr: Any, args: dict[str, Any]) -> bool:
    dst, _, length = str(args["dst"]).partition("/")
    for msg in ipr.get_routes(family=args["family"], table=args["table"]):
        if msg.get_attr("RTA_DST") == dst and str(msg["dst_len"]) == length:
            return True
    return False


class NetlinkWatcher:
    """A thread that calls `on_change(ipr)` once after each burst of netlink changes."""

    def __init__(self, on_change: Callable[[Any], object]) -> None:
        self.on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="netlink-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        try:
            with IPRoute() as events, IPRoute() as ipr:
                events.bind(groups=GROUPS)
                self._react(ipr)  # what changed before we listened (e.g. while we were down)
                while not self._stop.is_set():
                    if not self._drain(events, POLL_S):
                        continue
                    while self._drain(events, SETTLE_S):  # until it is quiet for a moment
                        if self._stop.is_set():
                            return
                    self._react(ipr)
        except Exception:
            log.exception("the netlink watcher stopped")

    def _react(self, ipr: Any) -> None:
        try:
            self.on_change(ipr)
        except Exception:  # keep watching: the next change may be repairable
            log.exception("reacting to a network change failed")

    @staticmethod
    def _drain(events: Any, timeout: float) -> bool:
        """Whether messages came within `timeout`; reads them all."""
        ready, _, _ = select.select([events.fileno()], [], [], timeout)
        if not ready:
            return False
        events.get()
        return True


IFF_UP = 0x1
DEAD_OPERSTATES = ("DOWN", "LOWERLAYERDOWN", "NOTPRESENT")


def usable_addresses(ipr: Any) -> frozenset[str]:
    """This host's addresses on links that are up (administratively and with a carrier):
    the sources a connection can still use. A link that went down keeps its IPv4 address,
    but nothing sent from it arrives any more."""
    up = set()
    for link in ipr.get_links():
        if link["flags"] & IFF_UP and link.get_attr("IFLA_OPERSTATE") not in DEAD_OPERSTATES:
            up.add(link["index"])
    found = set()
    for msg in ipr.get_addr():
        if msg["index"] in up:
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if address:
                found.add(str(ip_address(str(address).split("%", 1)[0])))
    return frozenset(found)
