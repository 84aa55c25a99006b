"""The composition root: builds the device, the stack, the dialers, the UDP relay, the DNS
forwarder and the control API, hands them to the engine (`engine.py`), and owns start and stop.

Build order matters only where one part needs another: the stack and its `DatagramPort`
first (the UDP relay and the DNS forwarder answer clients through it), the DNS resolver
before the rules' dialer (rules may match on names), the engine last.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tun2socks.device import TunDevice
from tun2socks.engine import (
    Collaborators,
    DatagramHandler,
    DatagramPort,
    DomainLookup,
    Engine,
    StatsSource,
)
from tun2socks.engine import no_domain as no_domain_lookup
from tun2socks.host import privileges, routes, uplink
from tun2socks.host.uplink import DefaultInterface
from tun2socks.net.stack import Stack, StackConfig
from tun2socks.observe import api, startup
from tun2socks.outbound import direct, routing
from tun2socks.outbound.dialer import Dialer, Socks5Dialer
from tun2socks.outbound.failover import FailoverDialer
from tun2socks.outbound.known_destinations import KnownDestinations
from tun2socks.outbound.reachability import ProxyProber
from tun2socks.outbound.session_pool import SessionPools
from tun2socks.outbound.socks5 import SocketHook
from tun2socks.path_watch import PathWatch
from tun2socks.udp_relay import UdpRelay
from tun2socks_dns import install as dns_parts
from tun2socks_dns.fakeip_store import store_path
from tun2socks_dns.install import DnsParts

if TYPE_CHECKING:
    from tun2socks.config import Settings

log = logging.getLogger("tun2socks")


def stack_config(settings: Settings, device: TunDevice) -> StackConfig:
    return StackConfig(
        mtu=device.mtu,
        offload=device.offload,
        recv_buffer=settings.limits.flow_buffer,
        send_buffer=settings.limits.flow_buffer,
        max_flows=settings.limits.max_flows,
        max_half_open=settings.limits.max_half_open,
        idle_timeout=settings.timeouts.idle,
        keepalive_interval=settings.timeouts.keepalive_interval,
        keepalive_probes=settings.timeouts.keepalive_probes,
        time_wait=settings.timeouts.time_wait,
        icmp_echo=settings.icmp.echo == "reply",
        reassembly_memory=settings.limits.reassembly_memory,
        reassembly_timeout=settings.limits.reassembly_timeout,
    )


# Takes over from SIGINT/SIGTERM the decision when to stop (`tun2socks exec`: its command ends).
Watch = Callable[[asyncio.AbstractEventLoop, asyncio.Event], None]


@dataclass(frozen=True)
class Proxies:
    """The proxies' dialers and what they share: `protect`, the hook that keeps an outbound
    socket out of the TUN (route.mark / route.bind_interface), or None, following `uplink` with
    bind_interface "auto"; and the logged-in sessions kept ready, with the pipelining probe, per
    SOCKS5 proxy. `default` is the default proxy's dialer; with several URLs a FailoverDialer,
    whose `proxy` is the proxy in use now (DNS upstreams and UDP associations follow it)."""

    protect: SocketHook | None
    uplink: DefaultInterface | None
    sessions: SessionPools
    default: Socks5Dialer
    named: dict[str, Socks5Dialer]

    @property
    def failovers(self) -> dict[str, FailoverDialer]:
        dialers = [("default", self.default), *self.named.items()]
        return {name: d for name, d in dialers if isinstance(d, FailoverDialer)}


@dataclass(frozen=True)
class Parts:
    """What `_serve` starts and `close_parts` closes."""

    paths: PathWatch
    prober: ProxyProber | None
    engine: Engine
    udp_relay: UdpRelay
    proxies: Proxies
    dns: DnsParts | None


async def build_proxies(settings: Settings, device: TunDevice) -> Proxies:
    # (pyroute2's synchronous API runs a loop of its own: not on this one's thread)
    default_interface = await asyncio.to_thread(
        uplink.follower, settings.route.bind_interface, device.name
    )
    current = default_interface.name if default_interface is not None else None
    protect = direct.protector(settings.route.mark, settings.route.bind_interface, current)
    sessions = SessionPools()
    socks = routing.proxy_dialer(settings.proxy, protect, sessions)
    named = {
        name: routing.proxy_dialer(c, protect, sessions, name)
        for name, c in settings.proxies.items()
    }
    return Proxies(protect, default_interface, sessions, socks, named)


def build_udp_relay(
    settings: Settings,
    proxies: Proxies,
    port: DatagramPort,
    loop: asyncio.AbstractEventLoop,
    rule_dialer: Dialer,
) -> UdpRelay:
    """UDP through SOCKS5 UDP ASSOCIATE (or refused, as udp.when_unsupported says)."""
    socks = proxies.default
    return UdpRelay(
        settings.udp,
        lambda: socks.proxy,
        port,
        loop,
        timeout=settings.proxy.connect_timeout,
        prepare_socket=proxies.protect,
        decide=rule_dialer.decide if isinstance(rule_dialer, routing.RuleDialer) else None,
    )


def build_prober(
    settings: Settings, proxies: Proxies, announce: logging.Logger
) -> ProxyProber | None:
    """A failover list has probes of its own (FailoverDialer); a single proxy gets this one;
    direct:// has none to probe."""
    socks = proxies.default
    if isinstance(socks, FailoverDialer) or socks.proxy.scheme == "direct":
        return None
    label = settings.proxy.redacted_url
    return ProxyProber(socks.proxy, label, prepare_socket=proxies.protect, log=announce)


def build_stats_sources(
    stack: Stack,
    proxies: Proxies,
    udp_relay: UdpRelay,
    prober: ProxyProber | None,
    dns: DnsParts | None,
) -> dict[str, StatsSource]:
    """Each component's counters, by the name the API and the metrics give them."""
    stats: dict[str, StatsSource] = {"udp": udp_relay.stats, "ip": stack.ip_stats}
    stats.update({f"proxy_{name}": f.stats for name, f in proxies.failovers.items()})
    stats.update(proxies.sessions.stats_sources())
    if prober is not None:
        stats["proxy_reachability"] = prober.stats
    if dns is not None:
        stats["dns"] = dns.stats
    return stats


async def build_parts(
    settings: Settings,
    device: TunDevice,
    loop: asyncio.AbstractEventLoop,
    announce: logging.Logger,
) -> Parts:
    """Everything the engine needs, and the engine: in the order one part needs another."""
    stack = Stack(stack_config(settings, device))
    port = DatagramPort(stack, loop)
    proxies = await build_proxies(settings, device)
    resolver = dns_parts.build_resolver(settings.dns) if settings.dns.enabled else None
    domain_lookup = (
        dns_parts.domain_lookup(resolver, loop.time) if resolver is not None else no_domain_lookup
    )
    socks, protect = proxies.default, proxies.protect
    rule_dialer = routing.build_dialer(settings, socks, proxies.named, protect, domain_lookup)
    udp_relay = build_udp_relay(settings, proxies, port, loop, rule_dialer)
    prober = build_prober(settings, proxies, announce)
    dns = None
    if resolver is not None:  # before the first packet: UDP/53 and TCP/53 are its from then on
        dns = dns_parts.build(
            settings.dns,
            resolver=resolver,
            socks=socks,
            dialer=rule_dialer,
            udp=udp_relay,
            port=port,
            mtu=device.mtu,
            fake_store=_fake_store(settings, device.name),
        )
    stats = build_stats_sources(stack, proxies, udp_relay, prober, dns)
    collaborators = build_collaborators(
        settings, proxies, rule_dialer, udp_relay, dns, domain_lookup, stats
    )
    engine = Engine(stack, device, loop, port, collaborators)
    paths = build_path_watch(engine, loop, device, proxies, udp_relay, dns)
    return Parts(paths, prober, engine, udp_relay, proxies, dns)


def build_collaborators(
    settings: Settings,
    proxies: Proxies,
    rule_dialer: Dialer,
    udp_relay: UdpRelay,
    dns: DnsParts | None,
    domain_lookup: DomainLookup,
    stats: dict[str, StatsSource],
) -> Collaborators:
    """The engine's: TCP to the rules' dialer and UDP to the relay, through the DNS parts when
    DNS is on (they take port 53 and pass the rest on), all behind route.auto's loop guard."""
    dialer: Dialer = rule_dialer
    udp: DatagramHandler = udp_relay
    udp_by_port: dict[int, DatagramHandler] = {}
    if dns is not None:
        dialer, udp = dns.dialer, dns.udp
        udp_by_port[dns_parts.DNS_PORT] = dns.forwarder
    dialer = routing.guard_loops(settings, dialer)
    known = None  # proxy.early_accept: SYN-ACK at once to destinations known to connect
    if settings.proxy.early_accept:
        known = KnownDestinations(settings.proxy.early_accept_ttl)
    address = proxies.default.proxy.address
    return Collaborators(dialer, udp, udp_by_port, domain_lookup, stats, address, known)


def build_path_watch(
    engine: Engine,
    loop: asyncio.AbstractEventLoop,
    device: TunDevice,
    proxies: Proxies,
    udp_relay: UdpRelay,
    dns: DnsParts | None,
) -> PathWatch:
    """Flows whose path went away are reset, not left hanging; shared connections reopened,
    and the proxy sessions kept ready dropped (they may leave from a link that is gone)."""
    reopen = [udp_relay.reopen, proxies.sessions.flush]
    if dns is not None:
        reopen.append(dns.forwarder.reopen_upstreams)
    return PathWatch(engine, loop, reopen=reopen, uplink=proxies.uplink, tun_name=device.name)


def stop_event(loop: asyncio.AbstractEventLoop, watch: Watch | None) -> asyncio.Event:
    """The event that ends `_serve`: set by `watch`, else by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    if watch is not None:
        watch(loop, stop)
    else:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def close_parts(parts: Parts) -> None:
    parts.paths.stop()
    if parts.prober is not None:
        await parts.prober.close()
    parts.engine.close()
    parts.udp_relay.close()
    for failover in parts.proxies.failovers.values():
        await failover.close()
    await parts.proxies.sessions.close()
    if parts.dns is not None:
        await parts.dns.forwarder.close()


async def _serve(settings: Settings, device: TunDevice, watch: Watch | None = None) -> int:
    loop = asyncio.get_running_loop()
    # The start-up summary and the proxy's comings and goings show at the default log level;
    # `exec` (a watch) keeps its command's output clean and says them at info only.
    announce = log if watch is not None else logging.getLogger(startup.SUMMARY_LOGGER)
    parts = await build_parts(settings, device, loop, announce)
    stop = stop_event(loop, watch)
    observer = None
    # What start-up built (modules, config, pydantic models: some 66,000 objects) lives as long
    # as the process: out of the collector's sight, a full collection no longer walks it (29 ms
    # measured), which otherwise lands as a pause on whatever flows are active.
    gc.freeze()
    try:
        parts.paths.start()
        parts.engine.start()
        observer = await api.start(parts.engine, settings)  # the control API and the capture
        prober, proxy = parts.prober, parts.proxies.default.proxy
        probe = await prober.first_probe() if prober is not None else None
        udp_verdict = await startup.udp_at_start(settings, proxy, probe, parts.proxies.protect)
        facts = startup.DeviceFacts(device.name, device.mtu, device.offload)
        announce.info("%s", startup.summary(settings, facts, probe, udp_verdict))
        if prober is not None:
            prober.start()
        await stop.wait()
        log.info("stopping: resetting %d open flows", len(parts.engine.relays))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await close_parts(parts)
        if observer is not None:
            await observer.close()  # after engine.close(): the capture sees the final RSTs
    return 0


def _raise_fd_limit(max_flows: int) -> None:
    """Each flow holds an upstream socket: lift the soft fd limit (often 1024) to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = max_flows + 256  # the TUN, the API, DNS and UDP sockets, some slack
    if hard != resource.RLIM_INFINITY and hard < needed:
        log.warning(
            "open file limit %d is below limits.max_flows + 256 (%d): flows beyond it will fail",
            hard,
            needed,
        )


def run(settings: Settings, *, user: str | None = None, watch: Watch | None = None) -> int:
    """Run until SIGINT or SIGTERM; the exit status. With `user`, the data path runs as that
    user in a child process (tun2socks.host.privileges)."""
    # Device, routes and resolver are set up before the loop starts and undone after it ended:
    # pyroute2's synchronous API runs a loop of its own.
    _raise_fd_limit(settings.limits.max_flows)
    host = routes.Host(settings)
    try:
        device = host.open_device()
        host.setup()
        host.watch()  # network changes: the proxy's host route follows the uplink
    except BaseException:  # DeviceError, SetupError: one line from the command line, exit 1
        host.close()
        raise
    # Plain asyncio: with Protocol-based I/O it measured as fast as uvloop or faster here
    # (bench/README.md), so there is no second event loop to depend on.
    failed = True  # route.strict keeps its block after a crash (tun2socks.host.strict)
    try:
        if user is not None:
            keep = bool(settings.route.mark)  # SO_MARK needs CAP_NET_ADMIN
            status = privileges.run_as(
                user, lambda: asyncio.run(_serve(settings, device)), keep_net_admin=keep
            )
        else:
            status = asyncio.run(_serve(settings, device, watch))
        failed = status != 0
        return status
    except KeyboardInterrupt:
        failed = False  # a signal before the loop took over: a deliberate stop
        raise
    finally:
        host.close(failed=failed)


def _fake_store(settings: Settings, device: str) -> Path | None:
    """Where fake-IP mappings outlive a restart: with dns.fake_persist, by default with
    route.auto (its state_dir is in use then)."""
    persist = settings.dns.fake_persist
    if not (settings.route.auto if persist is None else persist):
        return None
    return store_path(settings.route.state_dir, device)
