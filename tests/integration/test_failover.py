"""Proxy failover (issue 15, build 1): two danted in the server namespace, `kill -9` of the first
while 20 clients open new connections in a loop.

Each danted connects out from its own address (``external:``), so the HTTP server's /peer
names the proxy a request went through. The bed of this module serves DNS (dnsmasq on the
target), reached only through the proxy: `dig` shows that DNS follows the failover too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import apiclient, conftest, dnsbed
from tests.integration import bed as bedlib
from tests.integration.bedprocs import process_tree
from tests.integration.failoverprocs import Danted, Tinyproxy, p99

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements(dns=True)),
        reason="needs " + ", ".join(bedlib.missing_requirements(dns=True)),
    ),
]

HERE = Path(__file__).resolve().parent
RUN_DIR = conftest.RUN_DIR.with_name(conftest.RUN_DIR.name + "-failover")
FIRST, SECOND = (1090, "198.19.0.31"), (1091, "198.19.0.32")  # port, outgoing address
CLIENTS = 20
LOAD_S = 24.0
KILL_AT_S, RESTART_AFTER_S = 3.0, 5.0
RECOVERY_S = 10.0


@pytest.fixture(scope="module")
def dns_bed() -> Iterator[bedlib.Bed]:
    with bedlib.Bed(RUN_DIR / "bed", dns=True) as the_bed:
        yield the_bed


@pytest.fixture
def proxies(dns_bed: bedlib.Bed) -> Iterator[tuple[Danted, Danted]]:
    pair = (Danted(dns_bed, *FIRST), Danted(dns_bed, *SECOND))
    try:
        for danted in pair:
            danted.start()
        yield pair
    finally:
        for danted in pair:
            danted.stop()


def dig_answers(bed: bedlib.Bed) -> list[str]:
    proc = bed.run_cli(
        ["dig", f"@{dnsbed.CLIENT_RESOLVER}", "+time=2", "+tries=1", "+short", dnsbed.ZONE_NAME],
        timeout=20,
    )
    return proc.stdout.split()


def test_kill_9_of_the_first_proxy_under_20_looping_clients(
    dns_bed: bedlib.Bed, proxies: tuple[Danted, Danted], request: pytest.FixtureRequest
) -> None:
    first, second = proxies
    artifacts = RUN_DIR / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    extra = {
        "proxy": {"url": [first.url, second.url]},
        "dns": {"upstreams": [f"tcp://{bedlib.TARGET_IP}"], "cache": {"size": 0}},
        "log": {"level": "info"},
    }
    t2s = dns_bed.start_tun2socks(artifacts / "tun2socks.log", extra=extra)
    request.node.stash[conftest.STARTED_KEY] = [t2s]
    try:
        assert dig_answers(dns_bed) == [bedlib.TARGET_IP]
        args = [*dns_bed.cli_prefix(), *bedlib.helper_command("failoverload")]
        args += [bedlib.TARGET_IP, str(bedlib.HTTP_PORT), str(CLIENTS), str(LOAD_S)]
        load = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(KILL_AT_S)
        killed_at = time.time()
        first.kill()
        # DNS over TCP through the proxy, while the first one is gone.
        digs: list[list[str]] = []
        digger = threading.Thread(
            target=lambda: digs.extend(dig_answers(dns_bed) for _ in range(4))
        )
        digger.start()
        time.sleep(RESTART_AFTER_S)
        first.start()
        restarted_at = time.time()
        digger.join(30)
        out, _ = load.communicate(timeout=LOAD_S + 60)
        stats = apiclient.call(dns_bed, "/stats").json()
    finally:
        dns_bed.stop_tun2socks()
    assert digs == [[bedlib.TARGET_IP]] * 4, digs
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    before = [r for r in rows if r[0] + r[2] < killed_at]  # done before the kill
    after = [r for r in rows if r[0] >= killed_at + 1.0]
    assert before and {r[3] for r in before} == {FIRST[1]}, {r[3] for r in before}
    failed = [r for r in after if str(r[3]).startswith("error")]
    assert failed == [], failed[:5]
    connect_p99 = p99([r[1] for r in rows if r[0] >= killed_at])
    assert connect_p99 < 1.0, connect_p99
    outage = [r for r in after if r[0] < restarted_at]
    assert outage and {r[3] for r in outage} == {SECOND[1]}
    recovered = [r for r in rows if r[0] >= restarted_at + RECOVERY_S]
    assert recovered and {r[3] for r in recovered} == {FIRST[1]}, {r[3] for r in recovered}
    log_text = t2s.log_text()
    assert f"proxy {bedlib.SRV_VETH_IP}:{FIRST[0]} is down" in log_text
    assert f"proxy {bedlib.SRV_VETH_IP}:{FIRST[0]} is up again" in log_text
    failover_stats = stats["components"]["proxy_default"]
    assert failover_stats["p0_up"] == 1 and failover_stats["p0_failures"] >= 1
    assert failover_stats["active"] == 0 and failover_stats["p0_last_change_unix"] > 0
    print(f"failover: {len(rows)} connections, p99 connect after the kill {connect_p99:.3f} s")


def test_a_silent_proxy_is_passed_over_after_the_attempt_timeout_and_probed_back(
    dns_bed: bedlib.Bed, proxies: tuple[Danted, Danted], request: pytest.FixtureRequest
) -> None:
    """SIGSTOP: the kernel still accepts TCP for danted, but no SOCKS5 answer comes. The flow
    waits ATTEMPT_TIMEOUT_S (3 s) on the first proxy, then goes through the second; the next
    flows go to the second at once; after SIGCONT the probe brings the first one back."""
    first, second = proxies
    artifacts = RUN_DIR / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    extra = {"proxy": {"url": [first.url, second.url]}, "log": {"level": "info"}}
    t2s = dns_bed.start_tun2socks(artifacts / "tun2socks.log", extra=extra)
    request.node.stash[conftest.STARTED_KEY] = [t2s]
    url = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}/peer"

    def timed_peer() -> tuple[float, str]:
        began = time.monotonic()
        proc = dns_bed.run_cli(["curl", "-sS", "--max-time", "10", url], timeout=30)
        return time.monotonic() - began, proc.stdout.strip() or proc.stderr.strip()

    assert first.proc is not None
    stopped = process_tree(first.proc.pid)
    try:
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        took, peer = timed_peer()
        assert peer == SECOND[1] and 2.5 < took < 6.0, (took, peer)  # one slower handshake
        took, peer = timed_peer()
        assert peer == SECOND[1] and took < 1.0, (took, peer)  # no wait any more
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + RECOVERY_S
    while timed_peer()[1] != FIRST[1]:
        assert time.monotonic() < deadline, t2s.log_tail()
        time.sleep(0.2)
    assert "no connection within 3 s" in t2s.log_text()
    dns_bed.stop_tun2socks()


HTTP_PROXY = (3130, "198.19.0.33")  # port, outgoing address (tinyproxy's Bind)


def test_an_http_connect_proxy_and_a_socks5_proxy_in_one_failover_list(
    dns_bed: bedlib.Bed, request: pytest.FixtureRequest
) -> None:
    """Issue 16, item 3: an http:// URL goes wherever a socks5:// one does, failover lists
    too. tinyproxy first, danted second: `kill -9` of tinyproxy moves new flows (and DNS over
    TCP) to danted at once; after tinyproxy restarts, the background probe (`OPTIONS *`, RFC
    9110 section 9.3.7: no CONNECT) finds it alive and new flows use it again."""
    first, second = Tinyproxy(dns_bed, *HTTP_PROXY), Danted(dns_bed, *SECOND)
    artifacts = RUN_DIR / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    extra = {
        "proxy": {"url": [first.url, second.url]},
        "dns": {"upstreams": [f"udp://{bedlib.TARGET_IP}"], "cache": {"size": 0}},
        "log": {"level": "info"},
    }
    url = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}/peer"

    def peer() -> str:
        proc = dns_bed.run_cli(["curl", "-sS", "--max-time", "5", url], timeout=30)
        return proc.stdout.strip() or proc.stderr.strip()

    try:
        first.start()
        second.start()
        t2s = dns_bed.start_tun2socks(artifacts / "tun2socks.log", extra=extra)
        request.node.stash[conftest.STARTED_KEY] = [t2s]
        assert peer() == HTTP_PROXY[1]
        assert dig_answers(dns_bed) == [bedlib.TARGET_IP]  # udp:// asked over TCP (CONNECT)
        first.kill()
        assert [peer() for _ in range(3)] == [SECOND[1]] * 3  # no failed connection
        assert dig_answers(dns_bed) == [bedlib.TARGET_IP]
        first.start()
        deadline = time.monotonic() + RECOVERY_S
        while (seen := peer()) != HTTP_PROXY[1]:
            assert seen == SECOND[1], seen
            assert time.monotonic() < deadline, t2s.log_tail()
            time.sleep(0.2)
        stats = apiclient.call(dns_bed, "/stats").json()["components"]["proxy_default"]
    finally:
        dns_bed.stop_tun2socks()
        first.stop()
        second.stop()
    assert stats["active"] == 0 and stats["p0_up"] == 1 and stats["p0_probes"] >= 1, stats
    assert "OPTIONS * HTTP/1.1" in first.log_file.read_text(errors="replace")
    log_text = t2s.log_text()
    assert f"proxy {bedlib.SRV_VETH_IP}:{HTTP_PROXY[0]} is down" in log_text
    assert f"proxy {bedlib.SRV_VETH_IP}:{HTTP_PROXY[0]} is up again" in log_text
