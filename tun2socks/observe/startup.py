"""The start-up summary: one line, at the default log level, saying what this run does.

A new user who starts tun2socks with no proxy listening must not be met with silence (issue
13): the line names the device, its addresses, MTU and offloads, the proxy (redacted URL) and
whether it answered a probe, whether UDP goes through it, the DNS forwarder's mode, the API's
address, and whether routes were changed. It goes to the ``SUMMARY_LOGGER``, which
``logs.setup`` lets through at the default level (warning) as well.

``summary`` is pure (it formats what the composition root found out); ``udp_at_start`` asks
the proxy for a UDP association once (``outbound/udp_probe.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tun2socks.logs import SUMMARY_LOGGER
from tun2socks.outbound.reachability import FIRST_PROBE_TIMEOUT_S, ProbeResult
from tun2socks.outbound.socks5 import ProxyEndpoint, SocketHook
from tun2socks.outbound.udp_probe import UdpVerdict, probe_udp

if TYPE_CHECKING:
    from tun2socks.config import Settings

__all__ = ["SUMMARY_LOGGER", "DeviceFacts", "summary", "udp_at_start"]


@dataclass(frozen=True)
class DeviceFacts:
    name: str
    mtu: int
    offload: bool


def summary(
    settings: Settings, device: DeviceFacts, probe: ProbeResult | None, udp: UdpVerdict
) -> str:
    """The start-up line. ``probe`` is None when the proxy is not probed here (a failover list
    has its own probes)."""
    parts = [
        _device(settings, device),
        _proxy(settings, probe),
        f"{'UDP' if settings.proxy.scheme == 'direct' else 'UDP through the proxy'}: {_udp(udp)}",
        _dns(settings),
        f"API: http://{settings.api.listen}/" if settings.api.enabled else "API: off",
        _routes(settings, device.name),
    ]
    return "tun2socks running: " + "; ".join(parts)


def _device(settings: Settings, device: DeviceFacts) -> str:
    addresses = ", ".join(str(address) for address in settings.tun.addresses)
    if settings.tun.fd is not None:
        where = f"descriptor {settings.tun.fd} from the parent"
        addresses = addresses or "addresses set by the parent"
    else:
        where = f"device {device.name}"
    offloads = "with offloads" if device.offload else "without offloads"
    return f"{where} ({addresses or 'no addresses'}), mtu {device.mtu} {offloads}"


def _proxy(settings: Settings, probe: ProbeResult | None) -> str:
    if settings.proxy.scheme == "direct":
        return "no proxy: direct:// (each flow goes out from a socket of its own)"
    urls = [entry.redacted_url for entry in settings.proxy.entries()]
    if len(urls) > 1:
        return f"proxy failover list {', '.join(urls)} (the first that answers is used)"
    if probe is None:
        return f"proxy {urls[0]}"
    if probe.reachable:
        return f"proxy {urls[0]} {probe.detail}"
    return f"proxy {urls[0]} did not answer a probe ({probe.detail})"


def _udp(verdict: UdpVerdict) -> str:
    word = {True: "yes", False: "no", None: "unknown"}[verdict.carried]
    return f"{word} ({verdict.reason})"


def _dns(settings: Settings) -> str:
    dns = settings.dns
    if not dns.enabled:
        return "DNS: not intercepted (dns.enabled: false)"
    count = len(dns.upstreams)
    if count:
        upstreams = f"{count} upstream{'s' if count != 1 else ''}"
    else:
        upstreams = "each query to the server it was sent to, through the proxy"
        if settings.proxy.scheme == "direct":
            upstreams = "each query to the server it was sent to, directly"
    return f"DNS forwarder: {dns.mode} mode, {upstreams}"


def _routes(settings: Settings, device: str) -> str:
    route = settings.route
    if not route.auto:
        return "routes: not changed (route.auto: false)"
    text = f"routes: all traffic into {device} (route.auto, table {route.table})"
    if route.system_dns:
        text += ", system resolver pointed at the forwarder"
    return text


async def udp_at_start(
    settings: Settings,
    proxy: ProxyEndpoint,
    probe: ProbeResult | None,
    protect: SocketHook | None,
) -> UdpVerdict:
    """Whether UDP will go through the proxy, as far as can be told at start-up."""
    if not settings.udp.enabled:
        return UdpVerdict(False, "udp.enabled is false")
    if proxy.scheme == "http":
        return UdpVerdict(False, "an HTTP proxy's CONNECT carries TCP only")
    if proxy.scheme == "direct":
        return UdpVerdict(True, "directly, a socket per client endpoint")
    if probe is None:
        return UdpVerdict(None, "asked with the first datagram")
    if not probe.reachable:
        return UdpVerdict(None, "the proxy is unreachable")
    return await probe_udp(proxy, timeout=FIRST_PROBE_TIMEOUT_S, prepare_socket=protect)
