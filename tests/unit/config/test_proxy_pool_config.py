"""proxy.pipeline, proxy.fast_open, proxy.pool and proxy.early_accept (config/schema.py,
config/proxy_options.py)."""

from __future__ import annotations

import pytest

from tun2socks.config import ConfigError, Settings, load_settings

URL = ["proxy.url=socks5://127.0.0.1:1080"]


def settings(*overrides: str) -> Settings:
    return load_settings(None, [*URL, *overrides])


def test_defaults_probe_pipelining_keep_a_pool_and_leave_fast_open_off() -> None:
    proxy = settings().proxy
    assert proxy.pipeline == "auto"
    assert proxy.fast_open is False
    assert (proxy.pool.size, proxy.pool.max_age) == (8, 20.0)


def test_overrides() -> None:
    proxy = settings(
        "proxy.pipeline=false", "proxy.fast_open=true", "proxy.pool.size=0", "proxy.pool.max_age=5"
    ).proxy
    assert (proxy.pipeline, proxy.fast_open, proxy.pool.size, proxy.pool.max_age) == (
        False,
        True,
        0,
        5.0,
    )
    assert settings("proxy.pipeline=true").proxy.pipeline is True


def test_every_failover_entry_keeps_the_shared_settings() -> None:
    proxy = load_settings(
        None,
        [
            'proxy.url=["socks5://10.0.0.1:1080", "socks5://10.0.0.2:1080"]',
            "proxy.pipeline=false",
            "proxy.fast_open=true",
            "proxy.pool.size=3",
            "proxy.connect_timeout=4",
        ],
    ).proxy
    entries = proxy.entries()
    assert [e.host for e in entries] == ["10.0.0.1", "10.0.0.2"]
    for entry in entries:
        assert (entry.pipeline, entry.fast_open, entry.pool.size, entry.connect_timeout) == (
            False,
            True,
            3,
            4.0,
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("proxy.pipeline=maybe", "proxy.pipeline"),
        ("proxy.pool.size=-1", "proxy.pool.size"),
        ("proxy.pool.size=65", "proxy.pool.size"),
        ("proxy.pool.max_age=0", "proxy.pool.max_age"),
        ("proxy.pool.idle=5", "unknown key proxy.pool.idle"),
        ("proxy.fast_open=1", "proxy.fast_open"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(override)
    assert message in str(info.value)


def test_early_accept_is_off_by_default_and_takes_a_positive_ttl() -> None:
    proxy = settings().proxy
    assert (proxy.early_accept, proxy.early_accept_ttl) == (False, 60.0)
    proxy = settings("proxy.early_accept=true", "proxy.early_accept_ttl=5").proxy
    assert (proxy.early_accept, proxy.early_accept_ttl) == (True, 5.0)
    for bad in ("proxy.early_accept_ttl=0", "proxy.early_accept_ttl=-1", "proxy.early_accept=7"):
        with pytest.raises(ConfigError):
            settings(bad)
