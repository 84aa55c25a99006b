"""`tun2socks check -c FILE` against the bed's Dante servers, from the client namespace.

Each case is one real failure a user meets: the wrong port, the wrong password, a proxy that
refuses the target; and the working case. No tun2socks runs: `check` is its own client.
Then the UDP line (issue 13 item 4): danted carries UDP (a datagram's round trip to the bed's
UDP echo server), microsocks and `ssh -D` do not, and each says so in one line.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration import bed as bedlib
from tests.integration import sshbed
from tests.integration.checkrun import TARGET, run_check

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
]

REFUSED_TARGET = "203.0.113.9:80"  # outside what the bed's danted passes: it replies "not allowed"


def lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.strip() for line in proc.stdout.splitlines()]


def test_check_passes_against_working_proxies(bed: bedlib.Bed, tmp_path: Path) -> None:
    config = {
        "proxy": {"url": bed.proxy_url()},
        "proxies": {"with-auth": {"url": bed.proxy_url(auth=True)}},
    }
    proc = run_check(bed, tmp_path, config)
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
    proc = run_check(bed, tmp_path, {"proxy": {"url": f"socks5://{bedlib.SRV_VETH_IP}:1099"}})
    assert proc.returncode == 1
    out = lines(proc)
    assert "FAIL  TCP connect: connection refused" in out
    assert "skip  SOCKS5 greeting: an earlier step failed" in out


def test_check_fails_precisely_on_a_wrong_password(bed: bedlib.Bed, tmp_path: Path) -> None:
    config = {"proxy": {"url": bed.proxy_url(auth=True)}}
    proc = run_check(bed, tmp_path, config, password="not-the-password")
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
    proc = run_check(bed, tmp_path, {"proxy": {"url": bed.proxy_url()}}, target=REFUSED_TARGET)
    assert proc.returncode == 1
    expected = (
        f"FAIL  CONNECT {REFUSED_TARGET}: refused by the proxy: "
        "connection not allowed by ruleset (reply 2)"
    )
    assert expected in lines(proc), proc.stdout


def test_check_reports_a_bad_config_with_status_2(bed: bedlib.Bed, tmp_path: Path) -> None:
    proc = run_check(bed, tmp_path, {"proxy": {"url": bed.proxy_url()}, "route": {"table": 254}})
    assert proc.returncode == 2
    assert "route.table: must not be one of the kernel's tables" in proc.stderr


UDP_ECHO = f"{bedlib.TARGET_IP}:{bedlib.UDP_ECHO_PORTS[0]}"
ICMP_REFUSAL = (
    "UDP datagrams will be answered with ICMP port unreachable (udp.when_unsupported: unreachable)"
)


def udp_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in lines(proc) if line.startswith("UDP: ")]


def test_check_udp_yes_with_a_round_trip_through_danted(bed: bedlib.Bed, tmp_path: Path) -> None:
    bed.start_optional_servers(udp_echo=True)
    config = {
        "proxy": {"url": bed.proxy_url()},
        "proxies": {"with-auth": {"url": bed.proxy_url(auth=True)}},
    }
    proc = run_check(bed, tmp_path, config, udp_target=UDP_ECHO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = udp_lines(proc)
    assert len(found) == 2, proc.stdout
    for line in found:
        assert line.startswith(f"UDP: yes, relay {bedlib.SRV_VETH_IP}:"), line
        assert f", round trip to {UDP_ECHO} in " in line, line
    assert lines(proc)[-1] == "all checks passed"


def test_check_udp_fails_when_the_datagram_gets_no_answer(bed: bedlib.Bed, tmp_path: Path) -> None:
    silent = f"{bedlib.TARGET_IP}:7999"  # nothing listens there
    config = {"proxy": {"url": bed.proxy_url(), "connect_timeout": 1.5}}
    proc = run_check(bed, tmp_path, config, udp_target=silent)
    assert proc.returncode == 1, proc.stdout
    [line] = udp_lines(proc)
    assert f"accepted, but no answer from {silent} within 1.5 s" in line, line
    assert line.endswith("UDP datagrams will be sent to the proxy's relay and get no answer")


def test_check_udp_no_against_microsocks(bed: bedlib.Bed, tmp_path: Path) -> None:
    if bedlib.which("microsocks") is None:
        pytest.skip("needs microsocks (Debian package microsocks)")
    bed.start_optional_servers(microsocks=True)
    config = {"proxy": {"url": f"socks5://{bedlib.SRV_VETH_IP}:{bedlib.MICROSOCKS_PORT}"}}
    proc = run_check(bed, tmp_path, config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert udp_lines(proc) == [
        "UDP: no, the proxy refuses UDP ASSOCIATE: command not supported (reply 7); " + ICMP_REFUSAL
    ], proc.stdout
    assert lines(proc)[-1] == "all checks passed; UDP is not carried by 1 of 1"


def test_check_udp_no_against_ssh_dynamic_forwarding(bed: bedlib.Bed, tmp_path: Path) -> None:
    if sshbed.missing():
        pytest.skip("needs " + ", ".join(sshbed.missing()))
    with sshbed.ssh_dynamic(bed) as url:
        config = {"proxy": {"url": url}, "udp": {"when_unsupported": "drop"}}
        proc = run_check(bed, tmp_path, config, udp_target=UDP_ECHO)
    out = lines(proc)
    assert any(step.startswith(f"pass  CONNECT {TARGET}: bound ") for step in out), out
    [line] = udp_lines(proc)  # OpenSSH knows CONNECT only: it closes the connection
    assert line.startswith(
        "UDP: no, UDP ASSOCIATE failed: proxy closed the connection while waiting for the "
        "UDP ASSOCIATE reply"
    ), line
    assert line.endswith("; UDP datagrams will be dropped silently (udp.when_unsupported: drop)")
    assert proc.returncode == 1  # --udp-target asked for UDP
