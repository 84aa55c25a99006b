"""The DNS forwarder built from ``dns:`` settings, in pieces that ``tun2socks.app`` hands on.

When ``dns.enabled`` is true, ``tun2socks.app`` calls, in this order:
- ``build_resolver(config)``: the cache, static hosts and fake-IP pools; its
  ``domain_lookup(resolver, clock)`` answers "which name does this address stand for" (the
  rules' dialer needs it, so it exists before the dialer);
- ``build(config, ...)``, which returns ``DnsParts``: the forwarder (UDP to port 53), the
  dialer given wrapped by ``DnsDialer`` (TCP/53 and fake addresses, see dialer.py), the UDP
  handler given, in fake-IP mode behind ``FakeAddressGuard`` (UDP to fake addresses refused),
  and the forwarder's counters. The caller awaits ``parts.forwarder.close()`` at shutdown.

Upstream connections go through the default SOCKS5 proxy's own dialer (``socks``), so they
are never subject to rules meant for client flows. ``direct://`` upstreams use a plain socket
with the same protection hook as the proxy connection (``route.mark`` /
``route.bind_interface``): without one, and with routes sending everything into the TUN, a
``direct://`` upstream would loop back into the TUN, so use it only for an address that is
routed around the TUN. With ``direct://`` as the proxy (the bypass mode) every upstream, and
with no ``dns.upstreams`` each query's own destination (over TCP), is reached directly.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .cache import CacheSettings, DnsCache
from .dialer import DatagramHandler, DnsDialer, FakeAddressGuard
from .doh import DohUpstream
from .fakeip import FakeIpPool
from .fakeip_store import FakeIpStore
from .forwarder import DnsForwarder, ForwarderSettings
from .hosts import DomainSet, StaticHosts
from .resolver import Resolver
from .upstreams import (
    Connect,
    DestinationUpstreams,
    TcpUpstream,
    UdpUpstream,
    Upstream,
    plain_tcp_connect,
    plain_udp_exchange,
)
from .urls import DNS_PORT, UpstreamUrl, parse_upstream

if TYPE_CHECKING:
    from ipaddress import IPv4Address, IPv6Address
    from pathlib import Path

    from tun2socks.config import DnsConfig
    from tun2socks.engine import DatagramPort
    from tun2socks.outbound.dialer import HostDialer, Socks5Dialer

    IPAddress = IPv4Address | IPv6Address

UDP_OVERHEAD = 48  # IPv6 header + UDP header: a reply this much below the MTU fits

__all__ = ["DNS_PORT", "DnsParts", "build", "build_resolver", "domain_lookup"]


@dataclass(frozen=True, slots=True)
class DnsParts:
    forwarder: DnsForwarder  # takes UDP to port 53
    dialer: DnsDialer  # the engine's dialer
    udp: DatagramHandler  # the engine's handler of other UDP
    stats: Callable[[], dict[str, int]]


def build_resolver(config: DnsConfig) -> Resolver:
    cache = DnsCache(
        CacheSettings(
            size=config.cache.size,
            min_ttl=config.cache.min_ttl,
            max_ttl=config.cache.max_ttl,
            negative_ttl=config.cache.negative_ttl,
        )
    )
    pools = None
    if config.mode == "fake-ip":
        pools = [FakeIpPool(network, reuse_after=config.fake_ttl) for network in config.fake_range]
    return Resolver(
        cache=cache,
        hosts=StaticHosts(config.hosts),
        fake_pools=pools,
        real_domains=DomainSet(config.real_domains),
        fake_ttl=config.fake_ttl,
    )


def domain_lookup(
    resolver: Resolver, clock: Callable[[], float]
) -> Callable[[IPAddress], str | None]:
    """The name `address` stands for (a fake address's, or one a recent answer carried)."""

    def lookup(address: IPAddress) -> str | None:
        return resolver.domain_for(address, clock())

    return lookup


def build(
    config: DnsConfig,
    *,
    resolver: Resolver,
    socks: Socks5Dialer,
    dialer: HostDialer,
    udp: DatagramHandler,
    port: DatagramPort,
    mtu: int,
    fake_store: Path | None = None,
) -> DnsParts:
    """The forwarder and what goes in front of the engine's `dialer` and `udp` handler.
    Upstreams are reached through `socks`; replies to clients go through `port`. With
    `fake_store`, the fake-IP mappings are kept in that file across restarts. Needs a
    running event loop."""
    upstreams = [build_upstream(parse_upstream(url), socks, config) for url in config.upstreams]
    destinations = None
    if not upstreams:

        def to_destination(address: IPv4Address | IPv6Address) -> TcpUpstream:
            url = UpstreamUrl("tcp", str(address), DNS_PORT)
            return TcpUpstream(f"{url} (the query's destination)", _via_proxy(socks, url))

        destinations = DestinationUpstreams(to_destination)
    forwarder = DnsForwarder(
        resolver,
        upstreams,
        destinations,
        send_datagram=port.send_datagram,
        settings=ForwarderSettings(
            timeout=config.timeout,
            attempt_timeout=config.upstream_timeout,
            max_pending=config.max_pending,
            udp_ceiling=mtu - UDP_OVERHEAD,
        ),
    )
    if config.mode == "fake-ip":
        udp = FakeAddressGuard(udp, port, forwarder)
        if fake_store is not None:
            pools = list(resolver.fake_pools.values())
            store = FakeIpStore(fake_store, pools, asyncio.get_running_loop().time)
            store.load()
            store.start()
            forwarder.close_with(store.close)
    return DnsParts(forwarder, DnsDialer(dialer, forwarder), udp, forwarder.stats)


def build_upstream(url: UpstreamUrl, socks: Socks5Dialer, config: DnsConfig) -> Upstream:
    label = str(url)
    if url.scheme == "https":
        return DohUpstream(url, socks.dial_host, ca_file=config.ca_file)
    address = url.address
    assert address is not None  # parse_upstream checked it
    # An HTTP proxy has CONNECT only: a udp:// upstream is asked over TCP through it (and
    # through every proxy of a failover list that has one: TCP works through all of them).
    if url.scheme == "tcp" or (url.scheme == "udp" and _any_http(socks)):
        return TcpUpstream(label, _via_proxy(socks, url))
    # direct:// as the proxy (the bypass mode): there is no proxy, so udp:// goes direct too
    # (tcp:// and https:// already do: the bypass dialer connects directly).
    if url.scheme == "direct" or (url.scheme == "udp" and socks.proxy.scheme == "direct"):
        protect = socks.prepare_socket
        return UdpUpstream(
            label,
            plain_udp_exchange(address, url.port, protect),
            TcpUpstream(label, plain_tcp_connect(address, url.port, protect)),
        )
    from tun2socks.outbound import socks5_udp

    from .socks_udp import OnClose, OnDatagram, SocksUdpExchange

    async def associate(on_datagram: OnDatagram, on_close: OnClose) -> socks5_udp.UdpAssociation:
        return await socks5_udp.associate(
            socks.proxy,
            timeout=socks.timeout,
            prepare_socket=socks.prepare_socket,
            on_datagram=on_datagram,
            on_close=on_close,
        )

    exchange = SocksUdpExchange(address, url.port, associate)
    return UdpUpstream(
        label,
        exchange,
        TcpUpstream(label, _via_proxy(socks, url)),
        close_exchange=exchange.close,
        reopen_exchange=exchange.reopen,
    )


def _any_http(socks: Socks5Dialer) -> bool:
    from tun2socks.outbound.failover import FailoverDialer

    dialers = socks.dialers if isinstance(socks, FailoverDialer) else [socks]
    return any(dialer.proxy.scheme == "http" for dialer in dialers)


def _via_proxy(socks: Socks5Dialer, url: UpstreamUrl) -> Connect:
    address = url.address
    assert address is not None

    async def connect() -> socket.socket:
        return await socks.dial_host(address, url.port)

    return connect
