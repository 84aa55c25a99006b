"""``proxy.early_accept`` (issue 14, build 2, the stretch row) with the bed's danted and curl:
a repeat connection to a destination that connected moments ago gets its SYN-ACK before its
dial ends (``/stats`` components.early_accept.accepted counts exactly those flows) and works;
a destination that became refused after being known yields a reset (curl exit 56, or 7), not
a hang, and is forgotten: the next connection to it is refused before its SYN-ACK again.
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
        deadline = time.monotonic() + bedlib.READY_TIMEOUT_S
        while not self.listening():
            assert self.proc.poll() is None and time.monotonic() < deadline, "httpd not up"
            time.sleep(0.05)

    def listening(self) -> bool:
        return f":{PORT} " in self.bed.run_srv(["ss", "-Hltn"], timeout=10).stdout

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


def test_known_destination_is_accepted_early_and_a_refused_one_is_reset(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, server: HttpServer
) -> None:
    start_tun2socks(extra={"proxy": {"early_accept": True, "early_accept_ttl": 60.0}})
    assert early_stats(bed) == {"known": 0, "accepted": 0, "reset": 0}
    # The first connection waits for its upstream (unknown); the repeats are accepted early.
    for number in range(3):
        proc = curl(bed)
        assert proc.returncode == 0, f"request {number}: {proc.stderr}"
        assert proc.stdout == httpserver.SMALL_BODY.decode()
    assert early_stats(bed) == {"known": 1, "accepted": 2, "reset": 0}
    # The server goes away: danted's CONNECT is refused after the client has its SYN-ACK
    # and has sent its request. It must see a reset at once, not wait for --max-time.
    server.stop()
    started = time.monotonic()
    proc = curl(bed)
    elapsed = time.monotonic() - started
    assert proc.returncode in (CURL_RECV_FAILED, CURL_CONNECT_FAILED), (proc.returncode, proc)
    assert elapsed < 5.0, elapsed
    assert early_stats(bed) == {"known": 0, "accepted": 3, "reset": 1}
    assert upstream_errors(bed).get("connection_refused") == 1, upstream_errors(bed)
    # Forgotten: the next connection waits for its dial, and is refused before its SYN-ACK.
    proc = curl(bed)
    assert proc.returncode == CURL_CONNECT_FAILED, (proc.returncode, proc.stderr)
    assert early_stats(bed) == {"known": 0, "accepted": 3, "reset": 1}
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
