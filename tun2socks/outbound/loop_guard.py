"""Refuse flows to the proxy itself when they can only be our own connections looping back.

With ``route.auto`` and the host-route way (no ``route.mark``, no ``route.bind_interface``),
the proxy is kept out of the TUN by its host route alone. For a moment after a network
change that route can be gone (the kernel drops it with its link) before the netlink watcher
puts it back (tun2socks.host.watch): the connection tun2socks opens to the proxy then enters
the TUN, arrives as a new flow to the proxy, whose dial enters the TUN again, and so on. Such
a flow is refused at once (RST) instead: the outer connection fails fast and its client
retries, by which time the route is back.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address, ip_address

from tun2socks.net.events import FlowRequested
from tun2socks.outbound.dialer import Dialer, DialError

IPAddress = IPv4Address | IPv6Address


class LoopGuard:
    """A dialer that refuses flows to `endpoints` and passes the rest to `inner`."""

    def __init__(self, inner: Dialer, endpoints: Iterable[tuple[str, int]]) -> None:
        self.inner = inner
        self.endpoints: set[tuple[IPAddress, int]] = set()
        for host, port in endpoints:
            try:
                self.endpoints.add((ip_address(host), port))
            except ValueError:
                continue  # a name: its addresses are not known here

    async def dial(self, flow: FlowRequested) -> socket.socket:
        if (flow.dst, flow.dst_port) in self.endpoints:
            raise DialError(
                f"refused: a connection to the proxy {flow.dst} entered the TUN (a routing "
                "loop while the network changes)"
            )
        return await self.inner.dial(flow)
