"""The udp:, icmp: sections and the fragment limits: defaults, overrides, errors naming the key."""

from __future__ import annotations

import pytest

from tun2socks.config import ConfigError, Settings, load_settings

URL = ["proxy.url=socks5://127.0.0.1:1080"]


def settings(*overrides: str) -> Settings:
    return load_settings(None, [*URL, *overrides])


def test_defaults() -> None:
    s = settings()
    assert (s.udp.enabled, s.udp.idle_timeout, s.udp.max_sessions) == (True, 120.0, 1024)
    assert s.udp.when_unsupported == "unreachable"
    assert s.icmp.echo == "reply"
    assert (s.limits.reassembly_memory, s.limits.reassembly_timeout) == (4 * 1024 * 1024, 30.0)
    assert s.proxy.pipeline == "auto"


def test_overrides() -> None:
    s = settings(
        "udp.enabled=false",
        "udp.idle_timeout=30",
        "udp.max_sessions=10",
        "udp.when_unsupported=drop",
        "icmp.echo=drop",
        "limits.reassembly_memory=65536",
        "limits.reassembly_timeout=5",
        "proxy.pipeline=true",
    )
    assert (s.udp.enabled, s.udp.idle_timeout, s.udp.max_sessions) == (False, 30.0, 10)
    assert (s.udp.when_unsupported, s.icmp.echo) == ("drop", "drop")
    assert (s.limits.reassembly_memory, s.limits.reassembly_timeout) == (65536, 5.0)
    assert s.proxy.pipeline is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("udp.when_unsupported=reject", "udp.when_unsupported: must be 'unreachable' or 'drop'"),
        ("icmp.echo=yes", "icmp.echo: must be 'reply' or 'drop'"),
        ("udp.max_sessions=0", "udp.max_sessions"),
        ("udp.idle_timeout=0", "udp.idle_timeout"),
        ("limits.reassembly_memory=1000", "limits.reassembly_memory"),
        ("limits.reassembly_timeout=600", "limits.reassembly_timeout"),
        ("udp.idle=5", "unknown key udp.idle"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(override)
    assert message in str(info.value)
