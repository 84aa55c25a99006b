"""`proxy.url: direct://`, the bypass mode: what the configuration accepts and refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tun2socks.config import ConfigError, Settings, load_settings


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_settings(str(path))


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


@pytest.mark.parametrize("url", ["direct://", "DIRECT://", "direct:///"])
def test_direct_is_a_proxy_url_with_no_endpoint(tmp_path: Path, url: str) -> None:
    settings = load(tmp_path, f"proxy: {{url: '{url}'}}\n")
    assert settings.proxy.scheme == "direct"
    assert settings.proxy.redacted_url == "direct://"
    assert (settings.proxy.username, settings.proxy.password) == (None, None)
    assert settings.proxy.entries() == [settings.proxy]


def test_direct_from_the_command_line_flag() -> None:
    settings = load_settings(None, [], {"proxy.url": "direct://"})
    assert settings.proxy.scheme == "direct"


@pytest.mark.parametrize(
    "url", ["direct://10.0.0.1:1080", "direct://user:secret@", "direct://host", "direct://?x"]
)
def test_direct_takes_no_host_port_or_credentials(tmp_path: Path, url: str) -> None:
    message = error(tmp_path, f"proxy: {{url: '{url}'}}\n")
    assert message.endswith(
        "c.yaml:1: proxy.url: direct:// takes no host, port or credentials (it has no proxy)"
    )
    assert "secret" not in message


def test_direct_is_not_a_failover_entry(tmp_path: Path) -> None:
    text = "proxy: {url: ['socks5://192.0.2.1:1080', 'direct://']}\n"
    assert "proxy.url: entry 1: direct:// stands alone, not in a list" in error(tmp_path, text)


def test_direct_with_route_auto_needs_a_protected_socket(tmp_path: Path) -> None:
    """route.auto sends everything into the TUN: an unprotected direct socket would too, and
    come back as a new flow (a loop). SO_MARK or SO_BINDTODEVICE keeps it out."""
    message = error(tmp_path, "proxy: {url: 'direct://'}\nroute: {auto: true}\n")
    assert message.endswith(
        "c.yaml:2: route: direct:// with route.auto needs route.mark or route.bind_interface, "
        "or its sockets would loop back into the TUN"
    )
    assert load(tmp_path, "proxy: {url: 'direct://'}\nroute: {auto: true, mark: 0x2a}\n")
    assert load(tmp_path, "proxy: {url: 'direct://'}\nroute: {auto: true, bind_interface: e0}\n")
    # Without route.auto the routes are the user's, who may route tun2socks' sockets out.
    assert load(tmp_path, "proxy: {url: 'direct://'}\nroute: {auto: false}\n")


def test_a_named_direct_proxy_with_route_auto_needs_one_too(tmp_path: Path) -> None:
    text = (
        "proxy: {url: 'socks5://192.0.2.1:1080'}\n"
        "proxies: {out: {url: 'direct://'}}\n"
        "route: {auto: true}\n"
    )
    assert "c.yaml:3: route: direct:// with route.auto needs route.mark" in error(tmp_path, text)


def test_socks5_with_route_auto_alone_is_still_fine(tmp_path: Path) -> None:
    assert load(tmp_path, "proxy: {url: 'socks5://192.0.2.1:1080'}\nroute: {auto: true}\n")


def test_fake_ip_is_refused_with_direct(tmp_path: Path) -> None:
    """A fake address stands for a name only a proxy resolves: no proxy, no fake addresses."""
    text = "proxy: {url: 'direct://'}\ndns: {mode: fake-ip}\n"
    assert error(tmp_path, text).endswith(
        "c.yaml:2: dns: mode fake-ip needs a proxy that resolves names, not direct://"
    )
    assert load(tmp_path, "proxy: {url: 'direct://'}\ndns: {mode: forward}\n")


def test_system_dns_with_direct_needs_upstreams(tmp_path: Path) -> None:
    """The system's resolver is then an address inside the TUN: without dns.upstreams the
    forwarder would ask that address, directly, which is itself."""
    route = "route: {auto: true, mark: 0x2a, system_dns: true}\n"
    message = error(tmp_path, "proxy: {url: 'direct://'}\n" + route)
    assert message.endswith("dns: direct:// with route.system_dns needs dns.upstreams")
    upstreams = "dns: {upstreams: ['direct://192.0.2.53']}\n"
    assert load(tmp_path, "proxy: {url: 'direct://'}\n" + route + upstreams)
    assert load(tmp_path, "proxy: {url: 'direct://'}\n" + route + "dns: {enabled: false}\n")
