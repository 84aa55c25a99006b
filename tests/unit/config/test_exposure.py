"""Warnings about secrets other local users can read (tun2socks/exposure.py, cli.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tun2socks import cli
from tun2socks.config import exposure

PASSWORD = "Zq7-sekret-Pw"


def config_file(tmp_path: Path, text: str, mode: int) -> str:
    path = tmp_path / "tun2socks.yaml"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_file_with_a_literal_password_gets_one_warning(tmp_path: Path, mode: int) -> None:
    path = config_file(tmp_path, f"proxy:\n  url: socks5://alice:{PASSWORD}@10.0.0.1:1080\n", mode)
    [warning] = exposure.config_file_warnings(path)
    assert f"{mode:04o}" in warning and "proxy.url" in warning and "chmod 600" in warning
    assert PASSWORD not in warning


def test_owner_only_file_gets_no_warning(tmp_path: Path) -> None:
    path = config_file(tmp_path, f"proxy:\n  url: socks5://alice:{PASSWORD}@10.0.0.1:1080\n", 0o600)
    assert exposure.config_file_warnings(path) == []


@pytest.mark.parametrize(
    "text",
    [
        "proxy:\n  url: socks5://alice:${PROXY_PASSWORD}@10.0.0.1:1080\n",
        "proxy:\n  url: ${PROXY_URL}\n",
        "proxy:\n  url: socks5://alice@10.0.0.1:1080\n",
        "api:\n  token: ${API_TOKEN}\n",
    ],
)
def test_readable_file_with_secrets_from_the_environment_gets_no_warning(
    tmp_path: Path, text: str
) -> None:
    assert exposure.config_file_warnings(config_file(tmp_path, text, 0o644)) == []


def test_a_literal_token_and_named_proxy_passwords_are_found(tmp_path: Path) -> None:
    text = (
        f"api:\n  token: {PASSWORD}\nproxies:\n  eu:\n    url: socks5://bob:x${{A}}@10.0.0.2:1080\n"
    )
    [warning] = exposure.config_file_warnings(config_file(tmp_path, text, 0o644))
    assert "api.token" in warning and "proxies.eu.url" in warning  # x${A}: partly literal
    assert PASSWORD not in warning


def test_unreadable_or_missing_file_gets_no_warning(tmp_path: Path) -> None:
    assert exposure.config_file_warnings(str(tmp_path / "missing.yaml")) == []


def test_literal_password_on_the_command_line_gets_a_warning() -> None:
    assert exposure.command_line_warnings([f"socks5://a:{PASSWORD}@h:1"])
    assert not exposure.command_line_warnings(["socks5://a:${PW}@h:1", "tun.mtu=9000"])


def test_cli_run_logs_the_warning_once_without_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run stops right after the warnings, where the data path would start.
    import tun2socks.app

    def no_run(*args: object, **kwargs: object) -> int:
        return 0

    monkeypatch.setattr(tun2socks.app, "run", no_run)
    path = config_file(tmp_path, f"proxy:\n  url: socks5://alice:{PASSWORD}@10.0.0.1:1080\n", 0o644)
    assert cli.main(["run", "-c", path]) == 0
    err = capsys.readouterr().err
    assert err.count("readable by other users") == 1, err
    assert PASSWORD not in err
