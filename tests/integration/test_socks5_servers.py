"""The bed's SOCKS5 servers answer an independent client (PySocks, blocking) correctly, so that a
failure elsewhere is tun2socks', not the bed's: danted without and with username/password
authentication (RFC 1928, RFC 1929), IPv4 and IPv6 targets, its ruleset refusing what it must,
and microsocks."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from tests.integration import bed as bedlib
from tests.integration.httpserver import SMALL_BODY

pytestmark = pytest.mark.integration
pytest.importorskip("socks", reason="PySocks is in the test extra: pip install -e '.[test]'")

PROXY = bedlib.SRV_VETH_IP


def _pysocks_get(
    bed: bedlib.Bed,
    port: int,
    target: str,
    *,
    user: str | None = None,
    password: str | None = None,
    path: str = "/small",
) -> dict[str, Any]:
    args = [
        *bedlib.helper_command("pysocks_get"),
        PROXY,
        str(port),
        target,
        str(bedlib.HTTP_PORT),
        path,
    ]
    if user is not None:
        args += ["--user", user]
    env = dict(os.environ, PYSOCKS_PASSWORD=password or "")
    proc = subprocess.run(
        [*bed.cli_prefix(), *args], capture_output=True, text=True, timeout=30, env=env
    )
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def _assert_page(answer: dict[str, Any]) -> None:
    assert answer.get("status", "").split()[1:2] == ["200"], answer
    assert answer["body"] == SMALL_BODY.decode()


@pytest.mark.parametrize("target", [bedlib.TARGET_IP, bedlib.TARGET_IP6])
def test_danted_without_auth_answers_pysocks_connect_rfc1928(bed: bedlib.Bed, target: str) -> None:
    _assert_page(_pysocks_get(bed, bedlib.SOCKS_PORT, target))


def test_danted_with_username_password_answers_pysocks_rfc1929(bed: bedlib.Bed) -> None:
    answer = _pysocks_get(
        bed,
        bedlib.SOCKS_AUTH_PORT,
        bedlib.TARGET_IP,
        user=bed.socks_user,
        password=bed.socks_password,
    )
    _assert_page(answer)


def test_danted_rejects_a_wrong_password_rfc1929_section_2(bed: bedlib.Bed) -> None:
    answer = _pysocks_get(
        bed, bedlib.SOCKS_AUTH_PORT, bedlib.TARGET_IP, user=bed.socks_user, password="wrong"
    )
    assert answer.get("error", "").startswith("SOCKS5AuthError"), answer


def test_danted_refuses_a_destination_outside_its_rules_rfc1928_reply_02(bed: bedlib.Bed) -> None:
    # Only 198.19.0.0/16 and fd00:c8::/32 may be reached: anything else, such as the proxy's
    # own veth address, gets reply 0x02 (connection not allowed by ruleset).
    answer = _pysocks_get(bed, bedlib.SOCKS_PORT, bedlib.CLI_VETH_IP)
    assert answer.get("error", "").startswith("SOCKS5Error: 0x02"), answer


def test_microsocks_answers_pysocks_connect(bed: bedlib.Bed) -> None:
    bed.start_optional_servers(microsocks=True)
    _assert_page(_pysocks_get(bed, bedlib.MICROSOCKS_PORT, bedlib.TARGET_IP))
