"""Flows whose path is gone end with a reset, not a hang.

When a link goes down, or an address goes away, the upstream connections that leave from it
are dead, but TCP does not know: it retransmits for minutes, and the client's flow hangs with
it. The engine watches netlink itself (tun2socks.host.watch.NetlinkWatcher: a thread, reading
only, so it works without privileges in the data-path process of ``run --user`` too) and,
after each burst of changes, resets every flow whose upstream socket's local address is no
longer on a link that is up. The client gets an RST at once and opens a new connection, which
takes the new path (see host/watch.py for the proxy's host route).

When the path out itself changed (tun2socks.host.uplink.PathSummary: the usable addresses or
the main table's default routes), the connections shared by many flows are reopened: each
`reopen` callback given (the UDP relay's sessions, the DNS forwarder's upstream connections)
runs on the loop, and their next use opens new ones by the new path. With
``route.bind_interface: auto`` the default interface (`uplink`) is looked up again first, in
the watcher's thread, so that those new sockets bind to the new uplink.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from ipaddress import IPv6Address, ip_address
from typing import Any, Protocol

from tun2socks.host.uplink import DefaultInterface, PathSummary, summarize
from tun2socks.host.watch import NetlinkWatcher, usable_addresses
from tun2socks.relay import Relay

log = logging.getLogger("tun2socks")


class Engine(Protocol):
    relays: dict[int, Relay]

    def schedule_flush(self) -> None: ...


def reset_stranded(engine: Engine, usable: frozenset[str]) -> int:
    """Reset the flows whose upstream leaves from an address not in `usable`; how many."""
    stranded = []
    for relay in list(engine.relays.values()):
        transport = relay.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        if sockname and _normal(str(sockname[0])) not in usable:
            stranded.append(relay)
    for relay in stranded:
        relay.abort()
    if stranded:
        log.warning("network changed: reset %d flows whose upstream path is gone", len(stranded))
        engine.schedule_flush()
    return len(stranded)


def _normal(address: str) -> str:
    """The form usable_addresses gives: no zone (fe80::1%eth0), IPv4-mapped as IPv4."""
    try:
        ip = ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class PathWatch:
    """Starts the watcher thread; hands each change to the loop."""

    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        *,
        reopen: Sequence[Callable[[], object]] = (),
        uplink: DefaultInterface | None = None,
        tun_name: str | None = None,
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.reopen = list(reopen)
        self.uplink = uplink
        self.tun_name = tun_name  # a default route into it moves no path of ours
        self.watcher = NetlinkWatcher(self._changed)
        self._summary: PathSummary | None = None  # the path at the previous change

    def start(self) -> None:
        self.watcher.start()

    def _changed(self, ipr: Any) -> None:  # in the watcher's thread
        usable = usable_addresses(ipr)
        summary = summarize(ipr, usable, self.tun_name)
        if self.uplink is not None and self.uplink.refresh(ipr):
            log.warning("network changed: outbound sockets bind to %s", self.uplink.describe())
        moved = self._summary is not None and summary != self._summary
        self._summary = summary
        self.loop.call_soon_threadsafe(self._react, usable, moved)

    def _react(self, usable: frozenset[str], moved: bool) -> None:  # on the loop
        reset_stranded(self.engine, usable)
        if moved:
            for reopen in self.reopen:
                try:
                    reopen()
                except Exception:  # one part failing must not keep the others on the old path
                    log.exception("reopening after a network change failed")

    def stop(self) -> None:
        self.watcher.stop()
