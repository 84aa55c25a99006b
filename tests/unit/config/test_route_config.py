"""The route:, rules: and proxies: sections, tun.name fd://N, and the check/down/--user CLI."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from tun2socks.cli import build_parser, main
from tun2socks.commands.check import parse_target
from tun2socks.config import ConfigError, load_settings

PASSWORD = "route-Pw-71zq"


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "c.yaml"
    path.write_text("proxy: {url: 'socks5://192.0.2.1:1080'}\n" + text)
    return load_settings(str(path))


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


def test_route_defaults_change_nothing(tmp_path: Path) -> None:
    settings = load_settings(None, ["proxy.url=socks5://192.0.2.1:1080"])
    route = settings.route
    assert (route.auto, route.exclude, route.mark, route.bind_interface) == (False, [], 0, None)
    assert (route.table, route.system_dns, route.state_dir) == (7280, False, "/run/tun2socks")
    assert (settings.rules, settings.proxies) == ([], {})


def test_every_route_key_is_read(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        "route: {auto: true, exclude: 10.0.0.0/8, mark: 0x2a, bind_interface: eth0,"
        " table: 100, system_dns: true, state_dir: /tmp/x}\n",
    )
    route = settings.route  # type: ignore[attr-defined]
    assert route.exclude == [ip_network("10.0.0.0/8")]  # one item for a list
    assert (route.auto, route.mark, route.bind_interface, route.table) == (True, 42, "eth0", 100)
    assert (route.system_dns, route.state_dir) == (True, "/tmp/x")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("route: {table: 254}", "route.table: must not be one of the kernel's tables"),
        ("route: {table: 0}", "route.table: must be between 1 and 4294967295"),
        ("route: {mark: -1}", "route.mark: must be between 0 and 4294967295"),
        ("route: {exclude: [10.0.0.1/8]}", "route.exclude.0: has host bits set"),
        ("route: {exclude: [nonsense]}", "route.exclude.0: not an address or a prefix"),
        ("route: {bind_interface: 'a b'}", "route.bind_interface: must be an interface name"),
        ("rules: [{dst: 10.0.0.0/8}]", "rules.0.action: missing"),
        ("rules: [{action: allow}]", "rules.0.action: must be 'proxy', 'direct' or 'block'"),
        ("rules: [{port: 70000, action: block}]", "rules.0.port.0: must be ports 1..65535"),
        ("rules: [{port: 90-80, action: block}]", "the first not above the last"),
        ("rules: [{domain: 'a b', action: block}]", "rules.0.domain: must be a name with"),
        ("rules: [{protocol: icmp, action: block}]", "rules.0.protocol: must be 'tcp' or 'udp'"),
        ("rules: [{action: block, proxy: x}]", "rules.0: 'proxy: x' needs 'action: proxy'"),
        ("rules: [{action: proxy, proxy: x}]", "rules: rule 0: no proxy named 'x' (proxies: none)"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    message = error(tmp_path, text + "\n")
    assert message.startswith(f"{tmp_path / 'c.yaml'}:2: ")
    assert expected in message


def test_direct_with_route_auto_needs_a_protected_socket(tmp_path: Path) -> None:
    rules = "rules: [{dst: 10.0.0.0/8, action: direct}]\n"
    message = error(tmp_path, "route: {auto: true}\n" + rules)
    assert "rule 0: action direct with route.auto needs route.mark or route.bind_interface" in (
        message
    )
    assert load(tmp_path, "route: {auto: true, mark: 1}\n" + rules)
    assert load(tmp_path, "route: {auto: true, bind_interface: eth0}\n" + rules)
    assert load(tmp_path, rules)  # without route.auto the user routes, and may route it out


def test_named_proxies_and_rules_that_use_them(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        "proxies: {corp: {url: 'socks5://u:p@10.1.2.3:1080', connect_timeout: 3}}\n"
        "rules: [{domain: '*.corp.example', action: proxy, proxy: corp}]\n",
    )
    corp = settings.proxies["corp"]  # type: ignore[attr-defined]
    assert (corp.host, corp.port, corp.username, corp.connect_timeout) == ("10.1.2.3", 1080, "u", 3)


def test_a_named_proxys_password_appears_in_no_error(tmp_path: Path) -> None:
    message = error(
        tmp_path, f"proxies: {{p: {{url: 'socks5://u:{PASSWORD}@host', connect_timeout: 1}}}}\n"
    )
    assert "proxies.p.url" in message and PASSWORD not in message
    message = error(tmp_path, f"proxies: {{p: {{url: 'socks5://u:{PASSWORD}@h:1', x: 1}}}}\n")
    assert PASSWORD not in message


def test_device_may_be_a_descriptor_from_a_parent() -> None:
    settings = load_settings(None, ["proxy.url=socks5://h:1"], {"tun.name": "fd://3"})
    assert (settings.tun.name, settings.tun.fd) == ("fd://3", 3)
    assert load_settings(None, ["proxy.url=socks5://h:1"]).tun.fd is None
    with pytest.raises(ConfigError, match="must not contain"):
        load_settings(None, ["proxy.url=socks5://h:1"], {"tun.name": "fd://x"})


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("example.com:80", ("example.com", 80)),
        ("[::1]:443", ("::1", 443)),
        ("1.2.3.4:1", ("1.2.3.4", 1)),
    ],
)
def test_check_target(text: str, parsed: tuple[str, int]) -> None:
    assert parse_target(text) == parsed


@pytest.mark.parametrize("text", ["example.com", ":80", "host:0", "host:65536", "host:x"])
def test_bad_check_target(text: str) -> None:
    with pytest.raises(ConfigError, match="must be HOST:PORT"):
        parse_target(text)


def test_cli_has_check_down_and_run_user() -> None:
    parser = build_parser()
    args = parser.parse_args(["check", "-c", "f.yaml"])
    assert (args.command, args.config, args.target) == ("check", "f.yaml", "example.com:80")
    args = parser.parse_args(["down", "--device", "tun0", "--state-dir", "/tmp/s"])
    assert (args.command, args.device, args.state_dir) == ("down", "tun0", "/tmp/s")
    args = parser.parse_args(["run", "--proxy", "socks5://h:1", "--user", "nobody"])
    assert args.user == "nobody"


def test_run_user_must_exist(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--proxy", "socks5://h:1", "--user", "no-such-user-t2s"])
    assert code == 2
    assert "--user no-such-user-t2s: no such user" in capsys.readouterr().err


def test_down_with_nothing_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["down", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"nothing to undo: no records in {tmp_path}\n"


@pytest.mark.parametrize("name", ["ssh-dynamic.yaml", "dante.yaml"])
def test_example_configs_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DANTE_PASSWORD", PASSWORD)
    settings = load_settings(str(Path(__file__).resolve().parents[3] / "examples" / name))
    assert settings.route.auto
