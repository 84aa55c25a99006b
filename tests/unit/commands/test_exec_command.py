"""`tun2socks exec`: arguments and settings (the namespaces themselves: tests/integration)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tun2socks.cli import build_parser, main
from tun2socks.commands import exec_command
from tun2socks.host import userns


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["exec", *argv])


def test_the_command_keeps_its_own_options_after_the_separator() -> None:
    args = parse("--proxy", "socks5://127.0.0.1:1080", "--", "curl", "-v", "--proxy", "x")
    assert args.argv == ["--", "curl", "-v", "--proxy", "x"]
    assert args.command == "exec"


def test_exec_settings_never_touch_the_host_and_keep_the_api_off() -> None:
    args = parse("--proxy", "socks5://127.0.0.1:1080", "--set", "route.auto=true", "--", "true")
    settings = exec_command.build_settings(args)
    assert (settings.route.auto, settings.route.system_dns) == (False, False)
    assert settings.api.enabled is False
    assert settings.log.level == "warning"
    args = parse("--proxy", "socks5://h:1", "--set", "api.enabled=true", "--log-level", "debug")
    settings = exec_command.build_settings(args)
    assert settings.api.enabled is True and settings.log.level == "debug"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["exec", "--", "true"], "a proxy URL is needed"),
        (["exec", "--proxy", "socks5://127.0.0.1:1080"], "a command is needed"),
        (["exec", "--proxy", "socks5://127.0.0.1:1080", "--"], "a command is needed"),
        (["exec", "--proxy", "ftp://h:1", "--", "true"], "scheme must be"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tun2socks: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_forbidding_sysctls_are_named_with_their_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path
    (root / "kernel").mkdir()
    (root / "user").mkdir()
    (root / "kernel" / "unprivileged_userns_clone").write_text("0\n")
    (root / "user" / "max_user_namespaces").write_text("1000\n")
    (root / "kernel" / "apparmor_restrict_unprivileged_userns").write_text("1\n")
    monkeypatch.setattr(userns, "_SYSCTLS", root)
    assert userns.forbidding_sysctls() == [
        "kernel.unprivileged_userns_clone = 0",
        "kernel.apparmor_restrict_unprivileged_userns = 1",
    ]


def test_forbidden_message_names_the_exhausted_limit_without_a_forbidding_sysctl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    monkeypatch.setattr(userns, "_SYSCTLS", tmp_path)  # none of the settings exists
    error = userns._forbidden(OSError(errno.ENOSPC, "No space left on device"), "unshare")
    assert str(error) == (
        "cannot create a user namespace (unshare: No space left on device): "
        "user.max_user_namespaces (of this or an enclosing user namespace) is exhausted"
    )
    assert userns.restriction_note() == ""
    error = userns._forbidden(OSError(errno.EPERM, "Operation not permitted"), "unshare")
    assert "kernel.unprivileged_userns_clone, user.max_user_namespaces" in str(error)
