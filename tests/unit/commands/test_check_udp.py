"""`tun2socks check`'s UDP line where no proxy needs asking (tun2socks.commands.check.UdpCheck)."""

from __future__ import annotations

import pytest

from tun2socks.commands.check import UdpCheck, parse_target
from tun2socks.config import ConfigError, load_settings
from tun2socks.outbound.udp_probe import UdpVerdict, describe

# TEST-NET-1 (RFC 5737): never contacted by these tests
PROXY = "socks5://192.0.2.1:1080"


def test_udp_disabled_is_no_without_asking_the_proxy() -> None:
    settings = load_settings(None, ["udp.enabled=false"], {"proxy.url": PROXY})
    udp = UdpCheck(settings.udp, None, [])
    verdict = udp.verdict(settings.proxy, None, tcp_failed=False)
    assert verdict == UdpVerdict(False, "udp.enabled is false")
    assert describe(verdict, settings.udp.when_unsupported) == (
        "UDP: no, udp.enabled is false; UDP datagrams will be answered with ICMP port "
        "unreachable (udp.when_unsupported: unreachable)"
    )


def test_udp_is_unknown_when_a_tcp_step_failed() -> None:
    settings = load_settings(None, [], {"proxy.url": PROXY})
    udp = UdpCheck(settings.udp, ("198.51.100.7", 7), [])
    verdict = udp.verdict(settings.proxy, None, tcp_failed=True)
    assert verdict == UdpVerdict(None, "an earlier step failed")


def test_http_proxy_is_no_even_when_its_tcp_steps_failed() -> None:
    settings = load_settings(None, [], {"proxy.url": "http://192.0.2.1:3128"})
    udp = UdpCheck(settings.udp, None, [])
    verdict = udp.verdict(settings.proxy, None, tcp_failed=True)
    assert verdict == UdpVerdict(False, "an HTTP proxy's CONNECT carries TCP only")


def test_udp_target_must_be_host_and_port() -> None:
    assert parse_target("[::1]:7", "--udp-target") == ("::1", 7)
    with pytest.raises(ConfigError, match=r"^--udp-target 10\.0\.0\.1: must be HOST:PORT"):
        parse_target("10.0.0.1", "--udp-target")
