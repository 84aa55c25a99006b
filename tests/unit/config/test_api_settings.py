"""The `api` settings (the token rule, ${VAR} tokens) and the redacted view behind GET /config."""

from __future__ import annotations

import json

import pytest

from tun2socks.cli import build_parser, build_settings
from tun2socks.config import ConfigError, load_settings
from tun2socks.observe.snapshot import redacted_settings

PROXY = {"proxy.url": "socks5://127.0.0.1:1080"}
TOKEN = "api-T0ken-5e3x"


def settings(*overrides: str) -> object:
    return load_settings(None, list(overrides), PROXY)


def test_defaults() -> None:
    api = load_settings(None, [], PROXY).api
    assert (api.enabled, api.listen, api.token) == (True, "127.0.0.1:9090", None)
    assert (api.pcap.file, api.pcap.max_bytes) == (None, 100 * 1024 * 1024)


@pytest.mark.parametrize("listen", ["127.0.0.1:9090", "127.9.9.9:1", "[::1]:9090", "localhost:80"])
def test_loopback_needs_no_token(listen: str) -> None:
    assert load_settings(None, [f"api.listen={listen}"], PROXY).api.listen == listen


@pytest.mark.parametrize("listen", ["0.0.0.0:9090", "[::]:9090", "192.0.2.1:9090", "host:9090"])
def test_beyond_loopback_a_token_is_required(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"api.token: required when api.listen .* loopback"):
        load_settings(None, [f"api.listen={listen}"], PROXY)
    with_token = load_settings(None, [f"api.listen={listen}", f"api.token={TOKEN}"], PROXY)
    assert with_token.api.token is not None
    assert with_token.api.token.get_secret_value() == TOKEN


@pytest.mark.parametrize("listen", ["9090", "127.0.0.1", "127.0.0.1:0", "[::1:9090", "a b:1"])
def test_bad_listen_address(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"api\.listen: must be HOST:PORT"):
        load_settings(None, [f"api.listen={listen}"], PROXY)


def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2S_UNIT_TOKEN", TOKEN)
    api = load_settings(None, ["api.token=${T2S_UNIT_TOKEN}"], PROXY).api
    assert api.token is not None and api.token.get_secret_value() == TOKEN


def test_token_appears_in_no_error_repr_or_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_settings(None, [f"api.token={TOKEN}"], PROXY)
    assert TOKEN not in repr(loaded) and TOKEN not in str(loaded.api)
    assert TOKEN not in json.dumps(redacted_settings(loaded))
    with pytest.raises(ConfigError) as err:
        load_settings(None, ['api.token=""'], PROXY)
    assert "api.token: must not be empty" in str(err.value)
    monkeypatch.delenv("T2S_UNIT_MISSING", raising=False)
    with pytest.raises(ConfigError, match="T2S_UNIT_MISSING is not set"):
        load_settings(None, ["api.token=${T2S_UNIT_MISSING}"], PROXY)


def test_redacted_settings_hide_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2S_UNIT_PW", "pr0xy-Secret")
    loaded = load_settings(
        None,
        [f"api.token={TOKEN}"],
        {"proxy.url": "socks5://alice:${T2S_UNIT_PW}@127.0.0.1:1080"},
    )
    shown = redacted_settings(loaded)
    text = json.dumps(shown)
    assert "pr0xy-Secret" not in text and TOKEN not in text
    assert shown["proxy"]["url"] == "socks5://alice:***@127.0.0.1:1080"
    assert shown["api"]["token"] != TOKEN and shown["api"]["token"]
    assert shown["tun"]["mtu"] == loaded.tun.mtu  # the rest is shown as it is


def test_run_pcap_flag_sets_the_capture_file() -> None:
    args = build_parser().parse_args(["run", "--proxy", "socks5://127.0.0.1:1080", "--pcap", "x"])
    assert build_settings(args).api.pcap.file == "x"
