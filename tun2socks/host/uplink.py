"""The uplink as the main table has it now: its default interface per family, and a summary
that tells when the path out of the host changed.

Theory of operation
-------------------
``route.bind_interface: auto`` binds each outbound socket (SO_BINDTODEVICE) to the interface
of the main table's default route *at that socket's creation*, not to the one there was at
start: ``DefaultInterface`` holds that name per family, refreshed by the netlink watcher after
each burst of changes (a thread; reading one attribute is atomic, so sockets made on the
event loop meanwhile see the old or the new name, never a mix). The TUN is never the answer:
route.auto leaves the main table alone, but another program may put a default route there.

``PathSummary`` is what the data path compares before and after a burst of netlink changes
(usable addresses, the main table's default routes): when it differs, connections that are
shared by many flows (UDP associations, the DNS forwarder's upstream connections) are
reopened on the new path. Changes that do not touch it (our own host routes in route.table,
a neighbour entry) reopen nothing.

``default_route`` is pure; ``DefaultInterface.refresh`` and ``summarize`` take a pyroute2
IPRoute (or anything that answers ``get_routes`` and ``get_links`` the same way).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from tun2socks.host.watch import RTN_UNICAST, RouteView, main_routes, usable_addresses

FAMILIES = (socket.AF_INET, socket.AF_INET6)
AUTO_INTERFACE = "auto"
_FAMILY_NAMES: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


def default_route(routes: Sequence[RouteView], skip_oif: int | None = None) -> RouteView | None:
    """The default route the main table uses: prefix length 0, unicast, lowest metric (the
    kernel's choice among several uplinks); routes through `skip_oif` (the TUN) never."""
    candidates = [
        r
        for r in routes
        if r.dst.prefixlen == 0 and r.type == RTN_UNICAST and r.oif not in (None, skip_oif)
    ]
    return min(candidates, key=lambda r: r.metric) if candidates else None


@dataclass(frozen=True)
class PathSummary:
    usable: frozenset[str]
    defaults: tuple[tuple[int, int | None, str | None], ...]  # (family, oif, gateway)


def summarize(
    ipr: Any, usable: frozenset[str] | None = None, skip_device: str | None = None
) -> PathSummary:
    """The usable addresses and the default route of each family, as the main table has them.
    A default route through `skip_device` (the TUN) is not a path of ours: our sockets never
    take it (route.auto's own routes, or a user pointing the default at the TUN)."""
    skip = None
    if skip_device is not None:
        links = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}
        skip = links.get(skip_device)
    defaults = []
    for family in FAMILIES:
        best = default_route(main_routes(ipr, family), skip_oif=skip)
        defaults.append((family, best.oif, best.gateway) if best else (family, None, None))
    found = usable_addresses(ipr) if usable is None else usable
    return PathSummary(found, tuple(defaults))


class DefaultInterface:
    """The name of the default route's interface per family, for ``bind_interface: auto``."""

    def __init__(self, skip_device: str | None = None) -> None:
        self.skip_device = skip_device  # the TUN
        self._names: dict[int, str] = {}

    def name(self, family: int) -> str | None:
        """The interface a new socket of `family` binds to; None while there is no default
        route (an AF_INET6 socket with no IPv6 default route tries IPv4's interface)."""
        names = self._names  # one read: the watcher thread replaces the dict as a whole
        return names.get(family) or names.get(socket.AF_INET)

    def refresh(self, ipr: Any) -> bool:
        """Look the default routes up again; True when a name changed."""
        links = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        skip = next((i for i, n in links.items() if n == self.skip_device), None)
        names: dict[int, str] = {}
        for family in FAMILIES:
            best = default_route(main_routes(ipr, family), skip_oif=skip)
            if best is not None and best.oif in links:
                names[family] = str(links[best.oif])
        changed = names != self._names
        self._names = names
        return changed

    def describe(self) -> str:
        names = self._names
        return ", ".join(f"{_FAMILY_NAMES[f]} {n}" for f, n in names.items()) or "none"

    @classmethod
    def now(cls, skip_device: str | None = None) -> DefaultInterface:
        """One, looked up once now (the netlink watcher keeps it current from then on)."""
        found = cls(skip_device)
        with IPRoute() as ipr:
            found.refresh(ipr)
        return found


def follower(bind_interface: str | None, skip_device: str | None = None) -> DefaultInterface | None:
    """A DefaultInterface for ``route.bind_interface: auto``; None for a fixed name or none."""
    return DefaultInterface.now(skip_device) if bind_interface == AUTO_INTERFACE else None
