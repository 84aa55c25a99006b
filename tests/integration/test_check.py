"""`tun2socks check -c FILE` against the bed's Dante servers, from the client namespace.

Each case is one real failure a user meets: the wrong port, the wrong password, a proxy that
refuses the target; and the working case. No tun2socks runs: `check` is its own client.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import bed as bedlib

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
]

REPO = Path(__file__).resolve().parents[2]
TARGET = f"{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"
REFUSED_TARGET = "203.0.113.9:80"  # outside what the bed's danted passes: it replies "not allowed"


def check(
    bed: bedlib.Bed,
    tmp_path: Path,
    config: dict[str, Any],
    *,
    password: str | None = None,
    target: str = TARGET,
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env[bedlib.PASSWORD_ENV] = bed.socks_password if password is None else password
    command = [*bedlib.tun2socks_command(), "check", "-c", str(path), "--target", target]
    return subprocess.run(
        [*bed.cli_prefix(), *command],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.strip() for line in proc.stdout.splitlines()]


def test_check_passes_against_working_proxies(bed: bedlib.Bed, tmp_path: Path) -> None:
    config = {
        "proxy": {"url": bed.proxy_url()},
        "proxies": {"with-auth": {"url": bed.proxy_url(auth=True)}},
    }
    proc = check(bed, tmp_path, config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = lines(proc)
    assert out[0].startswith("pass  configuration") and out[-1] == "all checks passed"
    steps = [line for line in out if line.startswith(("pass", "FAIL", "skip"))][1:]
    assert [s.split(": ")[0] for s in steps] == [
        "pass  TCP connect",
        "pass  SOCKS5 greeting",
        "skip  authentication",
        f"pass  CONNECT {TARGET}",
        "pass  TCP connect",
        "pass  SOCKS5 greeting",
        "pass  authentication",
        f"pass  CONNECT {TARGET}",
    ]
    assert bed.socks_password not in proc.stdout + proc.stderr


def test_check_fails_precisely_on_a_wrong_port(bed: bedlib.Bed, tmp_path: Path) -> None:
    proc = check(bed, tmp_path, {"proxy": {"url": f"socks5://{bedlib.SRV_VETH_IP}:1099"}})
    assert proc.returncode == 1
    out = lines(proc)
    assert "FAIL  TCP connect: connection refused" in out
    assert "skip  SOCKS5 greeting: an earlier step failed" in out


def test_check_fails_precisely_on_a_wrong_password(bed: bedlib.Bed, tmp_path: Path) -> None:
    config = {"proxy": {"url": bed.proxy_url(auth=True)}}
    proc = check(bed, tmp_path, config, password="not-the-password")
    assert proc.returncode == 1
    out = lines(proc)
    assert "pass  SOCKS5 greeting: method username/password accepted" in out
    user = bed.socks_user
    assert f"FAIL  authentication: username/password rejected for user {user!r} (status 1)" in out
    assert f"skip  CONNECT {TARGET}: an earlier step failed" in out
    assert "not-the-password" not in proc.stdout + proc.stderr


def test_check_fails_precisely_when_the_proxy_refuses_the_target(
    bed: bedlib.Bed, tmp_path: Path
) -> None:
    proc = check(bed, tmp_path, {"proxy": {"url": bed.proxy_url()}}, target=REFUSED_TARGET)
    assert proc.returncode == 1
    expected = (
        f"FAIL  CONNECT {REFUSED_TARGET}: refused by the proxy: "
        "connection not allowed by ruleset (reply 2)"
    )
    assert expected in lines(proc), proc.stdout


def test_check_reports_a_bad_config_with_status_2(bed: bedlib.Bed, tmp_path: Path) -> None:
    proc = check(bed, tmp_path, {"proxy": {"url": bed.proxy_url()}, "route": {"table": 254}})
    assert proc.returncode == 2
    assert "route.table: must not be one of the kernel's tables" in proc.stderr
