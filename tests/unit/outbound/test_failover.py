"""Proxy failover bookkeeping (tun2socks.outbound.failover.FailoverState; pure, a stepped
clock) and the proxy.url list in the configuration."""

from __future__ import annotations

import pytest

from tun2socks.config import ConfigError, load_settings
from tun2socks.outbound import failover
from tun2socks.outbound.failover import FailoverState
from tun2socks.outbound.socks5 import ProxyEndpoint


def test_all_up_the_configured_order_and_the_first_is_active() -> None:
    state = FailoverState(["a:1", "b:2", "c:3"])
    assert (state.order(), state.active) == ([0, 1, 2], 0)


def test_a_failure_demotes_at_once_and_the_next_becomes_active() -> None:
    state = FailoverState(["a:1", "b:2", "c:3"])
    assert state.failed(0, "refused", now=100.0) is True
    assert (state.order(), state.active) == ([1, 2, 0], 1)  # a down one is still a last resort
    assert state.failed(0, "refused", now=101.0) is False  # already down: no second change
    stats = state.stats()
    assert (stats["p0_up"], stats["p0_failures"], stats["p0_last_change_unix"]) == (0, 2, 100)
    assert (stats["active"], stats["up"]) == (1, 2)


def test_recovery_puts_the_earlier_proxy_first_again() -> None:
    state = FailoverState(["a:1", "b:2"])
    state.failed(0, "refused", now=10.0)
    assert state.succeeded(0, now=15.0) is True
    assert state.succeeded(0, now=16.0) is False
    assert (state.active, state.stats()["p0_last_change_unix"]) == (0, 15)


def test_probe_backoff_doubles_up_to_the_bound_and_restarts_after_recovery() -> None:
    state = FailoverState(["a:1", "b:2"])
    state.failed(0, "timeout", now=0.0)
    delays = [state.next_probe_delay(0) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert delays[-1] == failover.BACKOFF_MAX_S
    state.succeeded(0, now=20.0)
    state.failed(0, "timeout", now=30.0)
    assert state.next_probe_delay(0) == failover.BACKOFF_MIN_S
    assert state.stats()["p0_probes"] == 7


def test_all_down_keeps_the_configured_order() -> None:
    state = FailoverState(["a:1", "b:2"])
    state.failed(1, "x", now=1.0)
    state.failed(0, "x", now=2.0)
    assert (state.order(), state.active, state.stats()["up"]) == ([0, 1], 0, 0)


def test_no_proxy_is_an_error() -> None:
    with pytest.raises(ValueError):
        FailoverState([])


# --- the background probe's question (RFC 1928 section 3; RFC 9110 section 9.3.7) -------------


def test_probe_of_a_socks5_proxy_is_the_greeting_and_wants_version_5() -> None:
    question, alive = failover.probe_question(ProxyEndpoint("192.0.2.1", 1080))
    assert question == b"\x05\x01\x00"
    assert alive(b"\x05\x00") and alive(b"\x05\xff")  # any method reply: it speaks SOCKS5
    assert not alive(b"") and not alive(b"HTTP/1.1 400 Bad Request\r\n")


def test_probe_of_an_http_proxy_is_options_asterisk_never_a_connect_rfc9110_9_3_7() -> None:
    proxy = ProxyEndpoint("192.0.2.1", 3128, "u", "secret", scheme="http")
    question, alive = failover.probe_question(proxy)
    assert question == (b"OPTIONS * HTTP/1.1\r\nHost: 192.0.2.1:3128\r\nConnection: close\r\n\r\n")
    assert b"secret" not in question and b"CONNECT" not in question
    # Any status line is a live proxy: tinyproxy answers 400, an authenticating one 407.
    assert alive(b"HTTP/1.1 400 Bad Request\r\nServer: tinyproxy/1.11.1\r\n")
    assert alive(b"HTTP/1.0 407 Proxy Authentication Required\r\n")
    assert not alive(b"\x05\x00") and not alive(b"") and not alive(b"HTTP/1.1 4")


def test_probe_host_header_brackets_an_ipv6_proxy_rfc9110_7_2() -> None:
    question, _ = failover.probe_question(ProxyEndpoint("2001:db8::1", 3128, scheme="http"))
    assert b"\r\nHost: [2001:db8::1]:3128\r\n" in question


# --- configuration ------------------------------------------------------------------------------


def test_proxy_url_list_keeps_its_order_and_each_entry_its_own_credentials() -> None:
    settings = load_settings(
        None, ['proxy.url=["socks5://u:pw@192.0.2.1:1080", "socks5://192.0.2.2:1081"]']
    )
    entries = settings.proxy.entries()
    assert [(e.host, e.port, e.username) for e in entries] == [
        ("192.0.2.1", 1080, "u"),
        ("192.0.2.2", 1081, None),
    ]
    assert settings.proxy.host == "192.0.2.1"  # the primary, for what needs one
    assert [e.redacted_url for e in entries] == [
        "socks5://u:***@192.0.2.1:1080",
        "socks5://192.0.2.2:1081",
    ]


def test_a_failover_list_may_mix_http_connect_and_socks5_proxies() -> None:
    settings = load_settings(
        None, ['proxy.url=["http://u:pw@192.0.2.1:3128", "socks5://192.0.2.2:1080"]']
    )
    assert [(e.scheme, e.port) for e in settings.proxy.entries()] == [
        ("http", 3128),
        ("socks5", 1080),
    ]


def test_a_single_url_is_its_own_only_entry() -> None:
    settings = load_settings(None, ["proxy.url=socks5://192.0.2.1:1080"])
    assert settings.proxy.entries() == [settings.proxy]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[]", "proxy.url: must list 1 to 16 proxy URLs"),
        ('["socks5://192.0.2.1:1", "ftp://b:2"]', "proxy.url: entry 1: scheme must be socks5"),
        ("[1]", "proxy.url: must be a proxy URL or a list of them"),
        ("7", "proxy.url: must be a proxy URL or a list of them (got 7)"),
    ],
)
def test_bad_proxy_url_lists_say_what_is_wrong(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, [f"proxy.url={value}"])
    assert expected in str(info.value)
