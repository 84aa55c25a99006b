"""direct:// wiring without I/O: the dialer that stands for the proxy, rules around it, the UDP
relay's choice of association, and `check`, which has nothing to probe."""

from __future__ import annotations

import asyncio
from ipaddress import ip_address
from pathlib import Path

import pytest

from tun2socks.cli import main
from tun2socks.config import UdpConfig, load_settings
from tun2socks.net.events import DatagramReceived, FlowRequested
from tun2socks.observe import startup
from tun2socks.outbound import routing
from tun2socks.outbound.dialer import DialError
from tun2socks.outbound.direct import BypassDialer
from tun2socks.outbound.socks5 import ProxyEndpoint
from tun2socks.udp_relay import UdpRelay


def test_proxy_dialer_of_direct_is_a_bypass_dialer_with_the_protection() -> None:
    settings = load_settings(None, ["proxy.url=direct://", "proxy.connect_timeout=3"])

    def protect(sock: object) -> None:
        del sock

    dialer = routing.proxy_dialer(settings.proxy, protect)
    assert isinstance(dialer, BypassDialer)
    assert (dialer.proxy.scheme, dialer.proxy.address) == ("direct", "direct")
    assert dialer.direct.protect is protect and dialer.direct.timeout == 3.0
    assert dialer.prepare_socket is protect  # DNS upstreams read it for their own sockets


def test_direct_endpoint_needs_no_port() -> None:
    assert ProxyEndpoint("", 0, scheme="direct").address == "direct"
    with pytest.raises(ValueError, match=r"port must be 1\.\.65535"):
        ProxyEndpoint("", 0)


def test_block_rule_in_bypass_mode_refuses_before_any_socket() -> None:
    """A `block` rule makes the bypass mode a packet filter: DialError (the engine's RST)."""
    overrides = ["proxy.url=direct://", "rules=[{dst: 192.0.2.0/24, action: block}]"]
    settings = load_settings(None, overrides)
    default = routing.proxy_dialer(settings.proxy, None)
    dialer = routing.build_dialer(settings, default, {}, None, lambda address: None)
    assert isinstance(dialer, routing.RuleDialer) and dialer.default is default
    flow = FlowRequested(1, ip_address("198.18.0.1"), 40000, ip_address("192.0.2.7"), 80)
    with pytest.raises(DialError, match=r"^blocked by rule 0$"):
        asyncio.run(dialer.dial(flow))


def test_check_says_there_is_nothing_to_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "direct.yaml"
    config.write_text("proxy: {url: 'direct://'}\n")
    assert main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    line = "skip  proxy default: direct:// has nothing to probe (TCP, UDP, DNS go out directly)"
    assert line in out
    assert "TCP connect" not in out


def test_a_flow_from_our_own_connecting_socket_is_refused_not_dialed() -> None:
    """Unprotected, our socket to 192.0.2.7:80 from port 41000 may be routed into the TUN: the
    flow it becomes is refused before any second socket is opened."""
    dialer = BypassDialer(ProxyEndpoint("", 0, scheme="direct"), timeout=1.0, prepare_socket=None)
    target = ip_address("192.0.2.7")
    dialer.direct.connecting.add((target, 80, 41000))
    looped = FlowRequested(2, ip_address("198.18.0.1"), 41000, target, 80)
    with pytest.raises(DialError, match="entered the TUN"):
        asyncio.run(dialer.dial(looped))


class RecordingPort:
    def __init__(self) -> None:
        self.sent: list[object] = []
        self.refused: list[object] = []

    def send_datagram(self, *args: object) -> None:
        self.sent.append(args)

    def refuse_datagram(self, datagram: object, *, mtu: int | None = None) -> None:
        self.refused.append(datagram)


def test_udp_from_our_own_direct_socket_is_dropped_not_relayed() -> None:
    """Each such datagram would open a session that sends it again, forever."""
    loop = asyncio.new_event_loop()
    try:
        port = RecordingPort()
        endpoint = ProxyEndpoint("", 0, scheme="direct")
        relay = UdpRelay(UdpConfig(), lambda: endpoint, port, loop, timeout=1.0)
        relay.own_ports.add(41000)
        src, dst = ip_address("198.18.0.1"), ip_address("192.0.2.7")
        for _ in range(3):
            relay.datagram_received(DatagramReceived(src, 41000, dst, 53, b"x"))
        assert relay.stats() == {"sessions": 0, "dropped_own_loop": 3}
        assert port.sent == port.refused == []
    finally:
        loop.close()


def test_start_up_summary_says_there_is_no_proxy_and_udp_goes_direct() -> None:
    settings = load_settings(None, ["proxy.url=direct://"])
    endpoint = ProxyEndpoint("", 0, scheme="direct")
    verdict = asyncio.run(startup.udp_at_start(settings, endpoint, None, None))
    line = startup.summary(settings, startup.DeviceFacts("tun0", 1500, True), None, verdict)
    assert "; no proxy: direct:// (each flow goes out from a socket of its own); " in line
    assert "; UDP: yes (directly, a socket per client endpoint); " in line
    assert "each query to the server it was sent to, directly" in line
    assert "probe" not in line
