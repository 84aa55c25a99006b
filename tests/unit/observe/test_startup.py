"""The start-up summary line (tun2socks.observe.startup.summary; pure) and its logger, which
shows at the default log level (issue 13 item 3)."""

from __future__ import annotations

import logging

from tun2socks import logs
from tun2socks.config import LogConfig, load_settings
from tun2socks.observe.startup import DeviceFacts, summary
from tun2socks.outbound.reachability import ProbeResult
from tun2socks.outbound.udp_probe import UdpVerdict

DEVICE = DeviceFacts("tun0", 1500, True)
YES = UdpVerdict(True, "UDP ASSOCIATE accepted, relay 10.0.0.2:4000")


def test_summary_names_every_part_in_one_line() -> None:
    settings = load_settings(None, [], {"proxy.url": "socks5://alice:s3cret@10.0.0.2:1080"})
    line = summary(settings, DEVICE, ProbeResult(True, "answered a probe in 0.4 ms"), YES)
    assert line == (
        "tun2socks running: device tun0 (198.18.0.1/15), mtu 1500 with offloads; "
        "proxy socks5://alice:***@10.0.0.2:1080 answered a probe in 0.4 ms; "
        "UDP through the proxy: yes (UDP ASSOCIATE accepted, relay 10.0.0.2:4000); "
        "DNS forwarder: forward mode, each query to the server it was sent to, through the "
        "proxy; API: http://127.0.0.1:9090/; routes: not changed (route.auto: false)"
    )
    assert "s3cret" not in line


def test_summary_of_an_unreachable_proxy_with_routes_and_fake_ip() -> None:
    overrides = [
        "route.auto=true",
        "route.system_dns=true",
        "dns.mode=fake-ip",
        "dns.upstreams=[udp://10.0.0.53]",
        "api.enabled=false",
        "tun.offload=false",
    ]
    settings = load_settings(None, overrides, {"proxy.url": "socks5://10.0.0.2:1080"})
    unknown = UdpVerdict(None, "the proxy is unreachable")
    device = DeviceFacts("tun0", 1500, False)
    line = summary(settings, device, ProbeResult(False, "connection refused"), unknown)
    for part in (
        "mtu 1500 without offloads",
        "proxy socks5://10.0.0.2:1080 did not answer a probe (connection refused)",
        "UDP through the proxy: unknown (the proxy is unreachable)",
        "DNS forwarder: fake-ip mode, 1 upstream",
        "API: off",
        "routes: all traffic into tun0 (route.auto, table 7280), system resolver pointed at "
        "the forwarder",
    ):
        assert part in line, line


def test_summary_of_a_failover_list_and_a_descriptor_from_a_parent() -> None:
    settings = load_settings(
        None,
        ["proxy.url=[socks5://10.0.0.2:1080, socks5://10.0.0.3:1080]", "dns.enabled=false"],
        {"tun.name": "fd://5"},
    )
    line = summary(settings, DEVICE, None, UdpVerdict(None, "asked with the first datagram"))
    assert line.startswith("tun2socks running: descriptor 5 from the parent (198.18.0.1/15)")
    assert "proxy failover list socks5://10.0.0.2:1080, socks5://10.0.0.3:1080" in line
    assert "DNS: not intercepted (dns.enabled: false)" in line


def test_summary_logger_passes_info_at_the_default_level_and_not_at_error() -> None:
    summary_log = logging.getLogger(logs.SUMMARY_LOGGER)
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    try:
        logs.setup(LogConfig())  # the default: warning
        assert summary_log.isEnabledFor(logging.INFO)
        assert not logging.getLogger("tun2socks").isEnabledFor(logging.INFO)
        logs.setup(LogConfig(level="error"))
        assert not summary_log.isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        summary_log.setLevel(logging.NOTSET)
