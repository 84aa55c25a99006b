"""``proxy.early_accept`` (issue 14, build 2, the stretch row) with the bed's danted and curl:
a repeat connection to a destination that connected moments ago gets its SYN-ACK before its
dial ends (``/stats`` components.early_accept.accepted counts exactly those flows) and works;
a destination that became refused after being known yields a reset (curl exit 56, or 7), not
a hang, and is forgotten: the next connection to it is refused before its SYN-ACK again.

With a warm session pool and a proxy known to take pipelined messages (danted), the client's
first data goes right behind the CONNECT (``pipelined``; ``pipelined_first_data`` counts the
flows whose request indeed left before the reply came); with microsocks (which loses
pipelined messages) the early flows keep waiting for the reply.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration import apiclient, httpserver
from tests.integration import bed as bedlib

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
]

PORT = 8097  # an HTTP server of this module, which the test stops
URL = f"http://{bedlib.TARGET_IP}:{PORT}/small"
CURL_CONNECT_FAILED, CURL_RECV_FAILED = 7, 56


class HttpServer:
    """The bed's HTTP server on PORT in the server namespace, stopped by the test."""

    def __init__(self, bed: bedlib.Bed) -> None:
        self.bed = bed
        args = [sys.executable, str(bedlib.HTTP_SERVER_SCRIPT), "--bind", "::"]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", bed.srv_ns, *args, "--port", str(PORT)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        bed.wait_listening({PORT}, watch=[("httpd-early-accept", self.proc)])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def server(bed: bedlib.Bed) -> Iterator[HttpServer]:
    started = HttpServer(bed)
    try:
        yield started
    finally:
        started.stop()


def curl(bed: bedlib.Bed) -> subprocess.CompletedProcess[str]:
    return bed.run_cli(["curl", "-sS", "--max-time", "10", URL], timeout=20)


def early_stats(bed: bedlib.Bed) -> dict[str, int]:
    found: dict[str, int] = apiclient.get_json(bed, "/stats")["components"]["early_accept"]
    return found


def upstream_errors(bed: bedlib.Bed) -> dict[str, int]:
    found: dict[str, int] = apiclient.get_json(bed, "/stats")["upstream_errors"]
    return found


NOT_PIPELINED = {"pipelined": 0, "pipelined_first_data": 0, "pipelined_redialed": 0}


def test_known_destination_is_accepted_early_and_a_refused_one_is_reset(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, server: HttpServer
) -> None:
    # Without a session pool: each early flow's dial (handshake and CONNECT) runs while its
    # client's request waits in the stack.
    early = {"early_accept": True, "early_accept_ttl": 60.0, "pool": {"size": 0}}
    start_tun2socks(extra={"proxy": early})
    assert early_stats(bed) == {"known": 0, "accepted": 0, "reset": 0, **NOT_PIPELINED}
    # The first connection waits for its upstream (unknown); the repeats are accepted early.
    for number in range(3):
        proc = curl(bed)
        assert proc.returncode == 0, f"request {number}: {proc.stderr}"
        assert proc.stdout == httpserver.SMALL_BODY.decode()
    assert early_stats(bed) == {"known": 1, "accepted": 2, "reset": 0, **NOT_PIPELINED}
    # The server goes away: danted's CONNECT is refused after the client has its SYN-ACK
    # and has sent its request. It must see a reset at once, not wait for --max-time.
    server.stop()
    started = time.monotonic()
    proc = curl(bed)
    elapsed = time.monotonic() - started
    assert proc.returncode in (CURL_RECV_FAILED, CURL_CONNECT_FAILED), (proc.returncode, proc)
    assert elapsed < 5.0, elapsed
    assert early_stats(bed) == {"known": 0, "accepted": 3, "reset": 1, **NOT_PIPELINED}
    assert upstream_errors(bed).get("connection_refused") == 1, upstream_errors(bed)
    # Forgotten: the next connection waits for its dial, and is refused before its SYN-ACK.
    proc = curl(bed)
    assert proc.returncode == CURL_CONNECT_FAILED, (proc.returncode, proc.stderr)
    assert early_stats(bed) == {"known": 0, "accepted": 3, "reset": 1, **NOT_PIPELINED}
    assert upstream_errors(bed).get("connection_refused") == 2, upstream_errors(bed)


def test_early_accept_is_off_by_default(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, server: HttpServer
) -> None:
    start_tun2socks()
    for _ in range(2):
        assert curl(bed).returncode == 0
    stats: dict[str, Any] = apiclient.get_json(bed, "/stats")
    assert "early_accept" not in stats["components"]
    server.stop()
    assert curl(bed).returncode == CURL_CONNECT_FAILED  # refused before any SYN-ACK


# --- the client's first data right behind the CONNECT, on a ready pooled session -------------


def pool_stats(bed: bedlib.Bed) -> dict[str, int]:
    found: dict[str, int] = apiclient.get_json(bed, "/stats")["components"]["pool"]
    return found


# The bed's danted is nearer than the shipped proxy.pool.min_round_trip: these tests keep the
# pool regardless (the bench's 20 ms proxy has it by default).
PIPELINED = {"early_accept": True, "pool": {"min_round_trip": 0.0}}


def know_the_server_and_warm_the_pool(bed: bedlib.Bed, pipeline: int) -> None:
    """One GET (the destination becomes known), then wait for the pipelining probe's verdict
    (`pipeline`: 1 danted, 0 microsocks) and a ready session."""
    proc = curl(bed)
    assert proc.returncode == 0, proc.stderr
    apiclient.wait_for("the probe's verdict", lambda: pool_stats(bed)["pipeline"] == pipeline)
    apiclient.wait_for("a ready session", lambda: pool_stats(bed)["size"] >= 1)


def test_first_data_goes_right_behind_the_connect_on_a_ready_session(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, server: HttpServer
) -> None:
    start_tun2socks(extra={"proxy": PIPELINED})
    know_the_server_and_warm_the_pool(bed, pipeline=1)  # danted takes pipelined messages
    gets = 6
    for number in range(gets):
        proc = curl(bed)
        assert proc.returncode == 0, f"request {number}: {proc.stderr}"
        assert proc.stdout == httpserver.SMALL_BODY.decode()  # nothing of the reply in it
    stats = early_stats(bed)
    assert stats["accepted"] == gets and stats["reset"] == 0, stats
    # Sequential GETs find a session ready (the pool refills after each flow); a miss or two
    # would take the old path, which is fine, but most must have gone pipelined.
    assert gets - 2 <= stats["pipelined"] <= gets, stats
    # The request left before the CONNECT reply came back (counted when the reply arrives
    # and the relay has already written client bytes): not true of the waiting path.
    assert stats["pipelined_first_data"] >= 1, stats
    assert stats["pipelined_redialed"] == 0, stats


def test_a_pipelined_flow_to_a_destination_gone_down_is_reset_and_forgotten(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, server: HttpServer
) -> None:
    t2s = start_tun2socks(extra={"proxy": PIPELINED})
    know_the_server_and_warm_the_pool(bed, pipeline=1)
    server.stop()  # known, but danted's CONNECT is refused from now on
    before = early_stats(bed)
    started = time.monotonic()
    proc = curl(bed)
    elapsed = time.monotonic() - started
    # The client had its SYN-ACK and sent its request behind the CONNECT: the refusal reply
    # must reach it as a reset at once, not as a hang until --max-time.
    assert proc.returncode in (CURL_RECV_FAILED, CURL_CONNECT_FAILED), (proc.returncode, proc)
    assert elapsed < 5.0, elapsed
    after = early_stats(bed)
    assert after["pipelined"] == before["pipelined"] + 1, (before, after)
    assert after["reset"] == before["reset"] + 1 and after["known"] == 0, (before, after)
    assert upstream_errors(bed).get("connection_refused") == 1, upstream_errors(bed)
    warnings = [line for line in t2s.log_text().splitlines() if "reset after an early" in line]
    assert len(warnings) == 1 and "connection refused" in warnings[0], warnings
    # Forgotten: the next connection waits for its dial, and is refused before its SYN-ACK.
    proc = curl(bed)
    assert proc.returncode == CURL_CONNECT_FAILED, (proc.returncode, proc.stderr)
    assert early_stats(bed)["accepted"] == after["accepted"]
    assert upstream_errors(bed).get("connection_refused") == 2, upstream_errors(bed)


def test_microsocks_early_flows_wait_for_the_connect_reply(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, server: HttpServer
) -> None:
    # microsocks 1.0.3 loses what follows a message in the same recv(): pipelining is off for
    # it (the probe finds out), and the early flows take the pooled sessions the old way.
    bed.start_optional_servers(microsocks=True)
    url = f"socks5://{bedlib.SRV_VETH_IP}:{bedlib.MICROSOCKS_PORT}"
    start_tun2socks(extra={"proxy": {"url": url, **PIPELINED}})
    know_the_server_and_warm_the_pool(bed, pipeline=0)
    hits = pool_stats(bed)["hits"]
    gets = 4
    for number in range(gets):
        proc = curl(bed)
        assert proc.returncode == 0, f"request {number}: {proc.stderr}"
        assert proc.stdout == httpserver.SMALL_BODY.decode()
    stats = early_stats(bed)
    assert stats["accepted"] >= gets and stats["reset"] == 0, stats
    assert stats["pipelined"] == 0 and stats["pipelined_first_data"] == 0, stats
    assert pool_stats(bed)["hits"] - hits >= gets - 2  # on pooled sessions, reply awaited


def test_a_client_that_half_closes_behind_its_pipelined_request_gets_the_whole_answer(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, server: HttpServer
) -> None:
    # Request and FIN follow the CONNECT before its reply: the proxy must see the FIN only as
    # the end of the client's data (shutdown(SHUT_WR) on the session), and answer in full.
    start_tun2socks(extra={"proxy": PIPELINED})
    know_the_server_and_warm_the_pool(bed, pipeline=1)
    size = 200_000
    args = ["half-close", "--host", bedlib.TARGET_IP, "--port", str(PORT), "--size", str(size)]
    for _ in range(3):
        result = bed.netclient([*args, "--timeout", "10"], timeout=30)
        assert result == {"status": 200, "length": size, "sha256": httpserver.payload_sha256(size)}
    stats = early_stats(bed)
    assert stats["pipelined"] >= 1 and stats["reset"] == 0, stats
