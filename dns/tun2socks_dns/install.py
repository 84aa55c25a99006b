"""The DNS forwarder built from ``dns:`` settings and plugged into the engine.

``install(engine, config)`` is called once by ``tun2socks.app`` when ``dns.enabled`` is true:
- UDP to port 53 goes to the forwarder (``engine.datagram_handlers[53]``);
- the engine's dialer is wrapped by ``DnsDialer`` (TCP/53 and fake addresses, see dialer.py),
  and in fake-IP mode its UDP handler by ``FakeAddressGuard`` (UDP to fake addresses refused);
- ``engine.domain_lookup`` answers "which name does this address stand for";
- ``engine.stats_sources["dns"]`` gives the forwarder's counters.
The caller awaits ``close()`` of the returned forwarder at shutdown.

Upstream connections go through the SOCKS5 proxy's own dialer (found inside the engine's
dialer), so they are never subject to rules meant for client flows. ``direct://`` upstreams use
a plain socket with the same protection hook as the proxy connection (``route.mark`` /
``route.bind_interface``): without one, and with routes sending everything into the TUN, a
``direct://`` upstream would loop back into the TUN, so use it only for an address that is
routed around the TUN.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from tun2socks.outbound.dialer import Socks5Dialer

from .cache import CacheSettings, DnsCache
from .dialer import DnsDialer, FakeAddressGuard
from .doh import DohUpstream
from .fakeip import FakeIpPool
from .fakeip_store import FakeIpStore, store_path
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

    from tun2socks.app import Engine
    from tun2socks.config import DnsConfig, Settings

UDP_OVERHEAD = 48  # IPv6 header + UDP header: a reply this much below the MTU fits


def install(engine: Engine, config: DnsConfig) -> DnsForwarder:
    loop = engine.loop
    socks = find_socks_dialer(engine.dialer) or Socks5Dialer(
        engine.proxy, timeout=engine.settings.proxy.connect_timeout
    )
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
    resolver = Resolver(
        cache=cache,
        hosts=StaticHosts(config.hosts),
        fake_pools=pools,
        real_domains=DomainSet(config.real_domains),
        fake_ttl=config.fake_ttl,
    )
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
        send_datagram=engine.send_datagram,
        settings=ForwarderSettings(
            timeout=config.timeout,
            attempt_timeout=config.upstream_timeout,
            max_pending=config.max_pending,
            udp_ceiling=engine.device.mtu - UDP_OVERHEAD,
        ),
    )
    engine.datagram_handlers[DNS_PORT] = forwarder
    inner = engine.dialer
    # A name for a fake address goes to the dialer in place (rules may match on it).
    dial_host = getattr(inner, "dial_host", socks.dial_host)
    engine.dialer = DnsDialer(inner, dial_host, forwarder)
    if pools is not None:
        engine.datagram_handler = FakeAddressGuard(engine.datagram_handler, engine, forwarder)
    engine.domain_lookup = lambda address: resolver.domain_for(address, loop.time())
    engine.stats_sources["dns"] = forwarder.stats
    if pools is not None and _persist(engine.settings, config):
        store = FakeIpStore(
            store_path(engine.settings.route.state_dir, engine.device.name), pools, loop.time
        )
        store.load()
        store.start()
        forwarder.close_with(store.close)
    return forwarder


def _persist(settings: Settings, config: DnsConfig) -> bool:
    """dns.fake_persist, or by default route.auto (its state_dir is in use then)."""
    return settings.route.auto if config.fake_persist is None else config.fake_persist


def find_socks_dialer(dialer: Any) -> Socks5Dialer | None:
    """The default proxy's dialer inside the engine's (possibly wrapped) dialer."""
    for _ in range(8):  # wrappers name what they wrap `inner` or `default`
        if isinstance(dialer, Socks5Dialer):
            return dialer
        dialer = getattr(dialer, "default", None) or getattr(dialer, "inner", None)
        if dialer is None:
            return None
    return None


def build_upstream(url: UpstreamUrl, socks: Socks5Dialer, config: DnsConfig) -> Upstream:
    label = str(url)
    if url.scheme == "https":
        return DohUpstream(url, socks.dial_host, ca_file=config.ca_file)
    address = url.address
    assert address is not None  # parse_upstream checked it
    if url.scheme == "tcp":
        return TcpUpstream(label, _via_proxy(socks, url))
    if url.scheme == "direct":
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
        label, exchange, TcpUpstream(label, _via_proxy(socks, url)), close_exchange=exchange.close
    )


def _via_proxy(socks: Socks5Dialer, url: UpstreamUrl) -> Connect:
    address = url.address
    assert address is not None

    async def connect() -> socket.socket:
        return await socks.dial_host(address, url.port)

    return connect
