"""What `tun2socks check` and the start-up summary say about UDP (udp_probe.describe; pure)."""

from __future__ import annotations

import asyncio

from tun2socks.outbound.socks5 import ProxyEndpoint
from tun2socks.outbound.udp_probe import UdpVerdict, describe, probe_udp


def test_yes_is_one_line_with_the_details() -> None:
    verdict = UdpVerdict(True, "relay 198.18.0.2:4000, round trip to 198.19.0.10:7000 in 1.0 ms")
    assert describe(verdict, "unreachable") == (
        "UDP: yes, relay 198.18.0.2:4000, round trip to 198.19.0.10:7000 in 1.0 ms"
    )


def test_no_says_the_reason_and_what_happens_to_datagrams_per_when_unsupported() -> None:
    verdict = UdpVerdict(False, "the proxy refuses UDP ASSOCIATE: command not supported (reply 7)")
    assert describe(verdict, "unreachable") == (
        "UDP: no, the proxy refuses UDP ASSOCIATE: command not supported (reply 7); UDP "
        "datagrams will be answered with ICMP port unreachable (udp.when_unsupported: unreachable)"
    )
    assert describe(verdict, "drop").endswith(
        "; UDP datagrams will be dropped silently (udp.when_unsupported: drop)"
    )


def test_an_association_without_answers_loses_datagrams_rather_than_refusing_them() -> None:
    verdict = UdpVerdict(False, "no answer", lost=True)
    assert describe(verdict, "unreachable") == (
        "UDP: no, no answer; UDP datagrams will be sent to the proxy's relay and get no answer"
    )


def test_unknown_says_why() -> None:
    assert describe(UdpVerdict(None, "an earlier step failed"), "drop") == (
        "UDP: unknown, an earlier step failed"
    )


def test_http_proxy_carries_no_udp_without_being_asked() -> None:
    proxy = ProxyEndpoint("192.0.2.1", 3128, scheme="http")  # never contacted
    verdict = asyncio.run(probe_udp(proxy, timeout=1.0, prepare_socket=None))
    assert verdict == UdpVerdict(False, "an HTTP proxy's CONNECT carries TCP only")
