"""Refuse flows to the proxy itself when they can only be our own connections looping back.

With ``route.auto`` and the host-route way (no ``route.mark``, no ``route.bind_interface``),
the proxy is kept out of the TUN by its host route alone. For a moment after a network
change that route can be gone (the kernel drops it with its link) before the netlink watcher
puts it back (tun2socks.host.watch): the connection tun2socks opens to the proxy then enters
the TUN, arrives as a new flow to the proxy, whose dial enters the TUN again, and so on. Such
a flow is refused at once (RST) instead: the outer connection fails fast and its client
retries, by which time the route is back.

A proxy given by host name is matched by its addresses of the moment: a flow to the proxy's
port is checked against what the name resolves to now (the dialer resolves it the same way
at each connect, and the name may have moved to an address that has no host route yet).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address, ip_address

from tun2socks.net.events import FlowRequested
from tun2socks.outbound.dialer import Dialer, DialError, FirstDataOffer

IPAddress = IPv4Address | IPv6Address


class LoopGuard:
    """A dialer that refuses flows to `endpoints` and passes the rest to `inner`."""

    def __init__(self, inner: Dialer, endpoints: Iterable[tuple[str, int]]) -> None:
        self.inner = inner
        self.endpoints: set[tuple[IPAddress, int]] = set()
        self.names: set[tuple[str, int]] = set()
        for host, port in endpoints:
            try:
                self.endpoints.add((ip_address(host), port))
            except ValueError:
                self.names.add((host, port))  # a name: its addresses when a flow comes

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        if (flow.dst, flow.dst_port) in self.endpoints or await self._named(flow):
            raise DialError(
                f"refused: a connection to the proxy {flow.dst} entered the TUN (a routing "
                "loop while the network changes)"
            )
        return await self.inner.dial(flow, offer=offer)

    async def _named(self, flow: FlowRequested) -> bool:
        """Whether the flow goes to a proxy given by name (only flows to a proxy's port ask)."""
        loop = asyncio.get_running_loop()
        for host, port in self.names:
            if port != flow.dst_port:
                continue
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                continue
            if any(ip_address(str(info[4][0])) == flow.dst for info in infos):
                return True
        return False
