"""The dialer that applies the rules: each flow through a proxy, directly, or refused.

It wraps the SOCKS5 dialers (the default proxy and the named ``proxies``) and a direct dialer.
``block`` raises DialError, which the engine turns into an RST for the client and one log line.
Every outbound socket, to a proxy or direct, gets the protection hook (``route.mark`` /
``route.bind_interface``), so that none of them can loop back into the TUN.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING

from tun2socks.net.events import FlowRequested
from tun2socks.outbound import socks5
from tun2socks.outbound.dialer import Dialer, DialError, FirstDataOffer, Socks5Dialer
from tun2socks.outbound.direct import BypassDialer, DirectDialer
from tun2socks.outbound.failover import FailoverDialer
from tun2socks.outbound.loop_guard import LoopGuard
from tun2socks.outbound.pipeline_probe import Pipelining, probe_pipelining
from tun2socks.outbound.pool_policy import PoolPolicy
from tun2socks.outbound.session_pool import SessionPool, SessionPools
from tun2socks.rules import Action, Decision, RuleSet

if TYPE_CHECKING:
    from tun2socks.config import ProxyConfig, Settings

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address


class RuleDialer:
    """Chooses the way out of each flow by the first matching rule."""

    def __init__(
        self,
        rules: RuleSet,
        default: Socks5Dialer,
        proxies: Mapping[str, Socks5Dialer],
        direct: DirectDialer,
        domain_lookup: Callable[[IPAddress], str | None],
    ) -> None:
        self.rules = rules
        self.default = default
        self.proxies = dict(proxies)
        self.direct = direct
        self.domain_lookup = domain_lookup

    def decide(self, dst: IPAddress, port: int, protocol: str = "tcp") -> Decision:
        """The decision for a flow (UDP relays may ask with protocol="udp")."""
        domain = self.domain_lookup(dst) if self.rules.uses_domains else None
        return self.rules.decide(dst, port, protocol, domain)

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        decision = self.decide(flow.dst, flow.dst_port)
        log.debug("flow %d to %s: %s", flow.flow_id, _target(flow.dst, flow.dst_port), decision)
        if decision.action is Action.BLOCK:
            raise DialError(f"blocked by rule {decision.rule}")
        if decision.action is Action.DIRECT:
            return await self.direct.dial(flow)
        return await self._proxy(decision).dial(flow, offer=offer)

    async def dial_host(
        self, host: str | IPAddress, port: int, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        """A connection to an address or a name (matched against the domain patterns)."""
        address: IPAddress | None = None
        if isinstance(host, str):
            with contextlib.suppress(ValueError):  # else a name
                address = ip_address(host)
        else:
            address = host
        domain = host if address is None and isinstance(host, str) else None
        if address is not None and self.rules.uses_domains:
            domain = self.domain_lookup(address)
        decision = self.rules.decide(address, port, "tcp", domain)
        log.debug("connection to %s: %s", _target(host, port), decision)
        if decision.action is Action.BLOCK:
            raise DialError(f"blocked by rule {decision.rule}")
        if decision.action is Action.DIRECT:
            return await self.direct.dial_host(host, port)
        return await self._proxy(decision).dial_host(host, port, offer=offer)

    def _proxy(self, decision: Decision) -> Socks5Dialer:
        return self.default if decision.proxy is None else self.proxies[decision.proxy]


def _target(host: str | IPAddress, port: int) -> str:
    return socks5.format_host_port(host, port)


def proxy_dialer(
    config: ProxyConfig,
    protect: socks5.SocketHook | None,
    sessions: SessionPools | None = None,
    name: str = "default",
) -> Socks5Dialer:
    """The dialer of one proxy setting: a FailoverDialer when its url lists several, a
    BypassDialer for direct:// (which stands alone: the schema keeps it out of lists). With
    `sessions`, each SOCKS5 proxy gets its pipelining probe and session pool registered there
    as `pool` (the default proxy) or `pool_NAME`, `_pN` after the first of a list."""
    if config.scheme == "direct":
        endpoint = socks5.ProxyEndpoint.from_config(config)
        return BypassDialer(endpoint, timeout=config.connect_timeout, prepare_socket=protect)
    entries = config.entries()
    dialers = []
    for index, entry in enumerate(entries):
        stats_name = "pool" if name == "default" else f"pool_{name}"
        dialers.append(
            _socks5_dialer(entry, protect, sessions, stats_name + (f"_p{index}" if index else ""))
        )
    return dialers[0] if len(dialers) == 1 else FailoverDialer(dialers)


def _socks5_dialer(
    entry: ProxyConfig,
    protect: socks5.SocketHook | None,
    sessions: SessionPools | None,
    stats_name: str,
) -> Socks5Dialer:
    proxy = socks5.ProxyEndpoint.from_config(entry)
    timeout = entry.connect_timeout
    probe = functools.partial(probe_pipelining, proxy, prepare_socket=protect)
    pipelining = Pipelining(entry.pipeline, probe, label=proxy.address)
    pool = None
    if proxy.scheme == "socks5" and entry.pool.size > 0:

        async def open_session(on_round_trip: socks5.RoundTripObserver) -> socket.socket:
            return await socks5.open_session(
                proxy,
                timeout=timeout,
                pipeline=pipelining.use_now(),
                prepare_socket=protect,
                fast_open=entry.fast_open,
                on_round_trip=on_round_trip,
            )

        policy = PoolPolicy(entry.pool.size, entry.pool.max_age, entry.pool.min_round_trip)
        pool = SessionPool(open_session, policy)
    if sessions is not None and proxy.scheme == "socks5":
        sessions.add(stats_name, pipelining, pool)
    return Socks5Dialer(
        proxy,
        timeout=timeout,
        prepare_socket=protect,
        pipeline=pipelining,
        pool=pool,
        fast_open=entry.fast_open,
    )


def build_dialer(
    settings: Settings,
    default: Socks5Dialer,
    named: dict[str, Socks5Dialer],
    protect: socks5.SocketHook | None,
    domain_lookup: Callable[[IPAddress], str | None],
) -> Socks5Dialer | RuleDialer:
    """The engine's dialer: `default` (the default proxy's dialer) when there are no rules and
    no named proxies, the rule dialer around it and the `named` proxies' dialers otherwise."""
    if not settings.rules and not settings.proxies:
        return default
    direct = DirectDialer(timeout=settings.proxy.connect_timeout, protect=protect)
    return RuleDialer(RuleSet.from_settings(settings.rules), default, named, direct, domain_lookup)


def guard_loops(settings: Settings, dialer: Dialer) -> Dialer:
    """`dialer` behind a LoopGuard in the host-route way of route.auto (loop_guard.py)."""
    route = settings.route
    if route.auto and not (route.mark or route.bind_interface):
        configs = [settings.proxy, *settings.proxies.values()]
        endpoints = [(e.host, e.port) for config in configs for e in config.entries()]
        return LoopGuard(dialer, endpoints)
    return dialer
