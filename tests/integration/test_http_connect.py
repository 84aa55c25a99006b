"""HTTP CONNECT upstreams (RFC 9110 section 9.3.6, Basic auth RFC 7617) against a real tinyproxy.

tinyproxy runs in the server namespace (tinyproxybed.py), with and without BasicAuth; tun2socks
runs in the client namespace with ``proxy.url: http://...``. The client namespace has no route
to the targets but the TUN, so whatever reaches them went through tinyproxy; its log shows the
CONNECTs. The bed has dnsmasq (dns=True) for DNS over TCP through CONNECT.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import bed as bedlib
from tests.integration import checkrun, conftest, dnsbed, httpserver, tinyproxybed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements(dns=True)) or bedlib.which("tinyproxy") is None,
        reason="needs tinyproxy and " + ", ".join(bedlib.missing_requirements(dns=True)),
    ),
]

URL = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"
URL6 = f"http://[{bedlib.TARGET_IP6}]:{bedlib.HTTP_PORT}"
TARGET = f"{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"
MIB = 1024 * 1024
ECHO_PORT = bedlib.UDP_ECHO_PORTS[0]


@pytest.fixture(scope="module")
def http_bed() -> Iterator[bedlib.Bed]:
    with bedlib.Bed(conftest.RUN_DIR / "bed-http-connect", dns=True) as the_bed:
        tinyproxybed.start(the_bed)
        yield the_bed


@pytest.fixture
def start(
    http_bed: bedlib.Bed, artifact_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Any]:
    started: list[bedlib.Tun2socks] = []
    request.node.stash[conftest.STARTED_KEY] = started

    def start_with(*, auth: bool = False, password: str | None = None) -> bedlib.Tun2socks:
        extra = {"proxy": {"url": tinyproxybed.url(http_bed, auth=auth)}}
        log_path = artifact_dir / f"tun2socks-{len(started)}.log"
        t2s = http_bed.start_tun2socks(log_path, extra=extra, password=password)
        started.append(t2s)
        return t2s

    yield start_with
    http_bed.stop_tun2socks()


def curl(bed: bedlib.Bed, *args: str, max_time: float = 10.0) -> subprocess.CompletedProcess[str]:
    return bed.run_cli(["curl", "-sS", "-g", "--max-time", str(max_time), *args], timeout=60)


def test_rfc9110_9_3_6_get_v4_and_v6_through_connect_without_auth(
    http_bed: bedlib.Bed, start: Any
) -> None:
    t2s = start()
    for url in (URL, URL6):
        proc = curl(http_bed, f"{url}/small")
        assert (proc.returncode, proc.stdout) == (0, httpserver.SMALL_BODY.decode()), proc.stderr
    connects = tinyproxybed.log_text(http_bed)
    assert f"CONNECT {TARGET}" in connects or f"{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}" in connects
    assert bedlib.TARGET_IP6 in connects, connects[-2000:]
    assert "running" in t2s.log_text()


def test_rfc7617_basic_auth_get_v4_and_v6(http_bed: bedlib.Bed, start: Any) -> None:
    t2s = start(auth=True)
    for url in (URL, URL6):
        proc = curl(http_bed, f"{url}/small")
        assert (proc.returncode, proc.stdout) == (0, httpserver.SMALL_BODY.decode()), proc.stderr
    assert http_bed.socks_password not in t2s.log_text()


def test_download_100_mib_sha256_through_connect(
    http_bed: bedlib.Bed, start: Any, tmp_path: Path
) -> None:
    start(auth=True)
    size = 100 * MIB
    dest = tmp_path / "download.bin"
    proc = curl(
        http_bed, "-o", str(dest), "-w", "%{http_code}", f"{URL}/bytes/{size}", max_time=120
    )
    assert (proc.returncode, proc.stdout) == (0, "200"), proc.stderr
    digest = hashlib.sha256()
    with open(dest, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    assert digest.hexdigest() == httpserver.payload_sha256(size)


def test_50_concurrent_connections_through_connect(http_bed: bedlib.Bed, start: Any) -> None:
    start()
    expected = hashlib.sha256(httpserver.SMALL_BODY).hexdigest()
    args = ["get-many", "--host", bedlib.TARGET_IP, "--path", "/small", "-n", "50", "-c", "50"]
    args += ["--expect-sha256", expected, "--req-timeout", "20", "--total-timeout", "40"]
    result = http_bed.netclient(args, timeout=60)
    assert (result["ok"], result["fail"]) == (50, 0), result["errors"]


def test_dns_goes_over_tcp_through_connect_and_udp_is_refused_with_one_warning(
    http_bed: bedlib.Bed, start: Any
) -> None:
    http_bed.start_optional_servers(udp_echo=True)
    t2s = start()
    # The forwarder asks the query's destination over TCP, through CONNECT (dnsmasq listens
    # on TARGET_IP:53, reachable only through tinyproxy).
    dig = ["dig", f"@{bedlib.TARGET_IP}", "+time=5", "+tries=1", dnsbed.ZONE_NAME, "A"]
    out = http_bed.run_cli(dig, timeout=30).stdout
    assert "status: NOERROR" in out and bedlib.TARGET_IP in out, out + t2s.log_tail()
    assert f"{bedlib.TARGET_IP}:53" in tinyproxybed.log_text(http_bed)
    for target in (bedlib.TARGET_IP, bedlib.TARGET_IP6, bedlib.TARGET_IP):
        args = ["refused", target, str(ECHO_PORT), "--timeout", "8"]
        proc = http_bed.run_cli([sys.executable, str(bedlib.UDP_TOOL_SCRIPT), *args], timeout=30)
        assert '"error": "ECONNREFUSED"' in proc.stdout, proc.stdout + proc.stderr
    warnings = [line for line in t2s.log_text().splitlines() if "UDP is not carried" in line]
    assert len(warnings) == 1, t2s.log_tail()
    assert "HTTP proxy" in warnings[0] and "asked again" not in warnings[0]


def test_a_named_http_proxy_chosen_by_a_rule_next_to_a_socks5_default(
    http_bed: bedlib.Bed, artifact_dir: Path, request: pytest.FixtureRequest
) -> None:
    extra = {
        "proxies": {"web": {"url": tinyproxybed.url(http_bed, auth=True)}},
        "rules": [{"dst": f"{bedlib.TARGET_IP6}/128", "action": "proxy", "proxy": "web"}],
    }
    t2s = http_bed.start_tun2socks(artifact_dir / "tun2socks.log", extra=extra)
    request.node.stash[conftest.STARTED_KEY] = [t2s]
    try:
        before = tinyproxybed.log_text(http_bed, auth=True)
        for url in (URL, URL6):
            proc = curl(http_bed, f"{url}/small")
            assert (proc.returncode, proc.stdout) == (0, httpserver.SMALL_BODY.decode())
        new_lines = tinyproxybed.log_text(http_bed, auth=True)[len(before) :]
        assert bedlib.TARGET_IP6 in new_lines  # the rule's destination: through tinyproxy
        assert f"{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}" not in new_lines  # the rest: danted
    finally:
        http_bed.stop_tun2socks()


def test_a_udp_dns_upstream_is_asked_over_tcp_through_connect(
    http_bed: bedlib.Bed, artifact_dir: Path, request: pytest.FixtureRequest
) -> None:
    extra = {
        "proxy": {"url": tinyproxybed.url(http_bed)},
        "dns": {"upstreams": [f"udp://[{bedlib.TARGET_IP6}]"]},
    }
    t2s = http_bed.start_tun2socks(artifact_dir / "tun2socks.log", extra=extra)
    request.node.stash[conftest.STARTED_KEY] = [t2s]
    try:
        dig = ["dig", f"@{dnsbed.CLIENT_RESOLVER}", "+time=5", "+tries=1", dnsbed.ZONE_NAME, "A"]
        out = http_bed.run_cli(dig, timeout=30).stdout
        assert "status: NOERROR" in out and bedlib.TARGET_IP in out, out + t2s.log_tail()
        assert f"[{bedlib.TARGET_IP6}]:53" in tinyproxybed.log_text(http_bed)
    finally:
        http_bed.stop_tun2socks()


def test_wrong_password_gives_one_clear_line_without_the_password(
    http_bed: bedlib.Bed, start: Any
) -> None:
    wrong = "wrong-" + http_bed.socks_password[::-1]
    t2s = start(auth=True, password=wrong)
    proc = curl(http_bed, f"{URL}/small")
    assert proc.returncode in (7, 52, 56), f"curl exit {proc.returncode}: {proc.stderr}"
    deadline = time.monotonic() + 3.0
    while "authentication failed" not in t2s.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    log = t2s.log_text()
    lines = [line for line in log.splitlines() if "authentication failed" in line]
    assert len(lines) == 1, log
    assert f"authentication failed for user '{http_bed.socks_user}' (40" in lines[0]
    assert "HTTP proxy" in lines[0]
    assert wrong not in log and http_bed.socks_password not in log


def check_lines(
    bed: bedlib.Bed, tmp_path: Path, config: dict[str, Any], password: str
) -> list[str]:
    proc = checkrun.run_check(bed, tmp_path, config, password=password)
    assert password not in proc.stdout + proc.stderr
    return [line.strip() for line in proc.stdout.splitlines()]


def test_check_probes_http_proxies_step_by_step(http_bed: bedlib.Bed, tmp_path: Path) -> None:
    config = {
        "proxy": {"url": tinyproxybed.url(http_bed)},
        "proxies": {
            "auth": {"url": tinyproxybed.url(http_bed, auth=True)},
            "no-credentials": {"url": tinyproxybed.url(http_bed).replace("3128", "3129")},
        },
    }
    out = check_lines(http_bed, tmp_path, config, http_bed.socks_password)
    steps = [line.split(": ")[0] for line in out if line.startswith(("pass ", "FAIL", "skip"))]
    answer, tunnel = f"HTTP CONNECT {TARGET} sent, answer", f"tunnel to {TARGET}"
    assert steps[1:] == [
        "pass  TCP connect",
        f"pass  {answer}",
        "pass  authentication",
        f"pass  {tunnel}",
    ] * 2 + [
        "pass  TCP connect",
        f"pass  {answer}",
        "FAIL  authentication",
        f"skip  {tunnel}",
    ], out
    assert any("requires authentication (40" in line for line in out), out
    assert out[-1] == "1 of 3 proxies failed"

    wrong = "wrong-" + http_bed.socks_password[::-1]
    config = {"proxy": {"url": tinyproxybed.url(http_bed, auth=True)}}
    out = check_lines(http_bed, tmp_path, config, wrong)
    failed = [line for line in out if line.startswith("FAIL")]
    assert len(failed) == 1, out
    assert failed[0].startswith(
        f"FAIL  authentication: authentication failed for user '{http_bed.socks_user}' (40"
    )
