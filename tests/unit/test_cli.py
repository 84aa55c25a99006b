"""The command line: commands, help, exit codes, messages, and settings built from arguments."""

import logging
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from tun2socks import __version__
from tun2socks.cli import build_parser, build_settings, main
from tun2socks.config import ConfigError, Settings

PASSWORD = "cli-Pw-93xq"


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[[str], str]:
    def write(text: str) -> str:
        path = tmp_path / "tun2socks.yaml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def app_stub(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> list[Settings]:
    """Stands in for tun2socks.app, which needs root and a TUN device; records its calls."""
    calls: list[Settings] = []

    def run(settings: Settings) -> int:
        calls.append(settings)
        logging.getLogger("tun2socks.app").warning("proxy password is %s", PASSWORD)
        if settings.tun.name == "interrupt":
            raise KeyboardInterrupt
        return 7

    module = types.ModuleType("tun2socks.app")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tun2socks.app", module)
    return calls


def settings_from(*argv: str) -> Settings:
    return build_settings(build_parser().parse_args(["run", *argv]))


# --- version and help --------------------------------------------------------------------------


def test_version_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"tun2socks {__version__}\n"


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tun2socks {__version__}\n"


def test_help_is_short_and_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tun2socks")
    assert "run " in out and "version " in out
    assert len(out.splitlines()) < 20


def test_run_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "--config FILE",
        "--device NAME",
        "--proxy URL",
        "--set KEY=VALUE",
        "--log-level",
    ):
        assert option in out
    assert len(out.splitlines()) < 30


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tun2socks", "version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, f"tun2socks {__version__}\n")


# --- usage errors ------------------------------------------------------------------------------


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--proxy", "socks5://h:1", "--frobnicate"]) == 2
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_bad_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--proxy", "socks5://h:1", "--log-level", "loud"]) == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err


# --- configuration errors: exit 2, one line ----------------------------------------------------


def test_run_needs_a_proxy_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "tun2socks: error: a proxy URL is needed: pass --proxy socks5://HOST:PORT "
        "(direct:// for none) or -c FILE\n"
    )
    assert captured.out == ""


def test_bad_config_file_names_file_line_and_key(
    config_file: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file("proxy:\n  url: socks5://127.0.0.1:1080\ntun:\n  mtu: 70000\n")
    assert main(["run", "-c", path]) == 2
    assert capsys.readouterr().err == (
        f"tun2socks: error: {path}:4: tun.mtu: must be between 68 and 65535 (got 70000)\n"
    )


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.yaml"
    assert main(["run", "-c", str(path)]) == 2
    assert capsys.readouterr().err == f"tun2socks: error: {path}: no such file\n"


def test_unknown_set_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--proxy", "socks5://h:1", "--set", "tun.mtuu=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tun2socks: error: --set tun.mtuu=1: unknown key tun.mtuu")
    assert err.count("\n") == 1


def test_errors_never_print_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    runs = [
        ["run", "--proxy", f"socks5://alice:{PASSWORD}@h"],
        ["run", "--proxy", f"socks5://alice:{PASSWORD}@h:1", "--set", "tun.mtu=0"],
        ["run", "--set", f"proxy.url=ftp://alice:{PASSWORD}@h:1"],
        ["run", "--set", f"proxy.uri=socks5://alice:{PASSWORD}@h:1"],
    ]
    for argv in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("tun2socks: error: ")
        assert PASSWORD not in err


# --- settings from arguments -------------------------------------------------------------------


def test_flags_win_over_set_which_wins_over_the_file(config_file: Callable[[str], str]) -> None:
    path = config_file(
        "tun: {name: filetun, mtu: 1400}\n"
        "proxy: {url: 'socks5://file.example:1080'}\n"
        "log: {level: info}\n"
    )
    settings = settings_from(
        "-c", path,
        "--set", "tun.name=settun",
        "--set", "tun.mtu=9000",
        "--set", "proxy.url=socks5://set.example:1080",
        "--device", "flagtun",
        "--proxy", "socks5://flag.example:2080",
        "--log-level", "DEBUG",
    )  # fmt: skip
    assert settings.tun.name == "flagtun"
    assert settings.tun.mtu == 9000
    assert (settings.proxy.host, settings.proxy.port) == ("flag.example", 2080)
    assert settings.log.level == "debug"


def test_file_alone(config_file: Callable[[str], str]) -> None:
    settings = settings_from("-c", config_file("proxy: {url: 'socks5://[::1]:1080'}\n"))
    assert (settings.proxy.host, settings.tun.name, settings.log.level) == (
        "::1",
        "tun0",
        "warning",
    )


def test_proxy_flag_alone() -> None:
    settings = settings_from("--proxy", "socks5://127.0.0.1:1080")
    assert settings.proxy.redacted_url == "socks5://127.0.0.1:1080"


def test_proxy_url_through_set_is_enough() -> None:
    settings = settings_from(
        "--set", "proxy.url=socks5://127.0.0.1:1080", "--set", "tun.offload=true"
    )
    assert settings.tun.offload is True


def test_set_values_keep_their_yaml_types() -> None:
    settings = settings_from(
        "--proxy",
        "socks5://h:1",
        "--set",
        "tun.addresses=[10.0.0.1/24]",
        "--set",
        "timeouts.idle=5",
    )
    assert [str(a) for a in settings.tun.addresses] == ["10.0.0.1/24"]
    assert settings.timeouts.idle == 5.0


def test_build_settings_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^--set tun.mtu: must be between 68 and 65535"):
        settings_from("--proxy", "socks5://h:1", "--set", "tun.mtu=65536")


# --- run -----------------------------------------------------------------------------------------


def test_run_passes_settings_to_the_app_and_returns_its_code(
    app_stub: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--proxy", f"socks5://alice:{PASSWORD}@127.0.0.1:1080", "--device", "t9"])
    assert code == 7
    assert [s.tun.name for s in app_stub] == ["t9"]
    # Logging was set up at the default level and the password registered for masking.
    assert logging.getLogger().level == logging.WARNING
    err = capsys.readouterr().err
    assert "warning tun2socks.app: proxy password is ***" in err
    assert PASSWORD not in err


def test_run_sets_up_logging_from_the_settings(
    app_stub: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["run", "--proxy", "socks5://h:1", "--set", "log.format=json", "--log-level", "error"])
        == 7
    )
    assert logging.getLogger().level == logging.ERROR
    assert capsys.readouterr().err == ""  # the stub's warning is below the level


def test_ctrl_c_exits_130_quietly(
    app_stub: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["run", "--proxy", "socks5://h:1", "--device", "interrupt", "--log-level", "error"])
        == 130
    )
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")
    assert len(app_stub) == 1
