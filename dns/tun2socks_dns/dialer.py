"""What the DNS forwarder puts in front of the engine's dialer and UDP handler.

- A TCP flow to port 53 (any address) is DNS over TCP: it is served by the forwarder through
  a local socket pair (``DnsForwarder.open_stream``), never relayed as opaque bytes.
- A TCP flow to an address of the fake-IP pool is opened with SOCKS5 ATYP=DOMAINNAME for the
  name that address stands for, so the proxy resolves it. A fake address with no name (its
  mapping was recycled, or it was never handed out) is refused: the client gets an RST, and
  the fake address never reaches the proxy.
- Everything else goes to the dialer that was there before.
- ``FakeAddressGuard``: UDP to a fake address is refused (see there).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Protocol

from tun2socks.outbound.dialer import DialError, FirstDataOffer, HostDialer

if TYPE_CHECKING:
    from tun2socks.net.events import DatagramReceived, FlowRequested

    from .forwarder import DnsForwarder

DNS_PORT = 53


class DatagramHandler(Protocol):
    def datagram_received(self, datagram: DatagramReceived) -> None: ...


class Refuser(Protocol):
    """How a datagram is refused with ICMP (`tun2socks.engine.DatagramPort`)."""

    def refuse_datagram(self, datagram: DatagramReceived, *, mtu: int | None = None) -> None: ...


class DnsDialer:
    """In front of the dialer that applies the rules (`inner`), which also dials fake
    addresses by name (rules may match on it)."""

    def __init__(self, inner: HostDialer, forwarder: DnsForwarder) -> None:
        self.inner = inner
        self.forwarder = forwarder

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        if flow.dst_port == DNS_PORT:
            return self.forwarder.open_stream(flow.dst)
        resolver = self.forwarder.resolver
        if resolver.is_fake(flow.dst):
            name = resolver.domain_for(flow.dst, self.forwarder.loop.time())
            if name is None:
                raise DialError(f"fake address {flow.dst} stands for no name (expired)")
            return await self.inner.dial_host(name, flow.dst_port, offer=offer)
        return await self.inner.dial(flow, offer=offer)


class FakeAddressGuard:
    """In front of the engine's UDP handler in fake-IP mode: UDP to a fake address is refused.

    A fake address means nothing to the proxy, and a UDP relay that sent the datagram by name
    would get replies from the real address, which the client would not accept. So such a
    datagram gets ICMP port unreachable (clients such as browsers then fall back from QUIC to
    TCP at once, and TCP reaches the proxy by name), and the fake address never leaves.
    """

    def __init__(self, inner: DatagramHandler, port: Refuser, forwarder: DnsForwarder):
        self.inner = inner
        self.port = port
        self.forwarder = forwarder

    def datagram_received(self, datagram: DatagramReceived) -> None:
        if self.forwarder.resolver.is_fake(datagram.dst):
            self.forwarder.counters["fake_udp_refused"] += 1
            self.port.refuse_datagram(datagram)
        else:
            self.inner.datagram_received(datagram)
