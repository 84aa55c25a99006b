"""One base for the errors a user can act on: the command line prints each as one line and
exits with its status, whatever the command that raised it."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from tun2socks.cli import main
from tun2socks.commands.status import StatusError
from tun2socks.config import ConfigError, Settings
from tun2socks.device import DeviceError
from tun2socks.errors import UserError
from tun2socks.host.privileges import PrivilegeError
from tun2socks.host.resolver import ResolverError
from tun2socks.host.routes import SetupError
from tun2socks.host.state import AlreadyRunning, StateError

ONE_LINE_ERRORS = [
    ConfigError,
    DeviceError,
    SetupError,
    StateError,
    AlreadyRunning,
    PrivilegeError,
    ResolverError,
    StatusError,
]


@pytest.mark.parametrize("cls", ONE_LINE_ERRORS)
def test_every_one_line_error_is_a_user_error(cls: type[Exception]) -> None:
    assert issubclass(cls, UserError)


def test_a_configuration_error_exits_2_the_others_1() -> None:
    assert ConfigError.exit_status == 2
    assert {cls.exit_status for cls in ONE_LINE_ERRORS if cls is not ConfigError} == {1}


@pytest.fixture
def app_raising(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> Iterator[list[UserError]]:
    """Stands in for tun2socks.app (it needs root and a TUN): its run raises what is queued."""
    queued: list[UserError] = []

    def run(settings: Settings) -> int:
        raise queued.pop()

    module = types.ModuleType("tun2socks.app")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tun2socks.app", module)
    yield queued


@pytest.mark.parametrize(
    "error",
    [
        DeviceError("cannot open TUN device t2s0: need root or CAP_NET_ADMIN"),
        SetupError("tun2socks is already running on device tun0 (pid 4242); stop it first"),
    ],
)
def test_run_prints_a_user_error_as_one_line_and_exits_1(
    app_raising: list[UserError], capsys: pytest.CaptureFixture[str], error: UserError
) -> None:
    app_raising.append(error)
    assert main(["run", "--proxy", "socks5://127.0.0.1:1080"]) == 1
    assert capsys.readouterr().err == f"tun2socks: error: {error}\n"
