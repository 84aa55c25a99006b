"""DNS over the default path under load: every query a client sends into the TUN goes over one
reused TCP connection through the proxy to the resolver it was sent to (here the bed's dnsmasq,
which closes each TCP connection after 100 queries: its TCP_MAX_QUERIES). dnsperf at its full
rate for 15 s: no SERVFAIL, nothing lost, no asyncio error lines in tun2socks' log, and its
reconnect counter equals the closes the server made, counted from a capture at the server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.integration import bed as bedlib
from tests.integration import dnsbed

REPO = Path(__file__).resolve().parents[2]
RUN_DIR = REPO / "test-artifacts" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-dnsload"
LOAD_SECONDS = 15
NAMES = 20000  # distinct names (the zone answers any name under it); the cache is off anyway
TCP_SYN = 0x02
OUTSTANDING = 200  # dnsperf's queries in flight (100 by default): many cross each close

missing = bedlib.missing_requirements(dns=True)
if bedlib.which("dnsperf") is None:
    missing.append("dnsperf (Debian package dnsperf)")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(missing), reason="needs " + ", ".join(missing)),
]


@pytest.fixture(scope="module")
def dns_bed() -> Iterator[bedlib.Bed]:
    with bedlib.Bed(RUN_DIR / "bed", dns=True) as the_bed:
        yield the_bed


class ServerCloses:
    """A capture on the server namespace's loopback, where dnsmasq's TCP connections are (danted
    reaches it there): the SYN, FIN and RST segments of each connection, in both directions,
    tell which connections dnsmasq ended (its FIN or RST came first). A connection is the client
    port and how many SYNs it had carried before: on loopback the kernel lets danted reuse a port
    whose last connection dnsmasq still holds in TIME-WAIT (net.ipv4.tcp_tw_reuse = 2), and
    keyed by the port alone, two connections counted as one (CI: 281 closes for 293)."""

    def __init__(self, bed: bedlib.Bed, path: Path) -> None:
        self.path = path
        marks = "tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0"
        bpf = f"host {bedlib.TARGET_IP} and tcp port 53 and {marks}"
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                bed.srv_ns,
                "dumpcap",
                "-q",
                "-i",
                "lo",
                "-f",
                bpf,
                "-w",
                str(path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 15
        while not path.exists() or path.stat().st_size == 0:  # the header, once it captures
            assert self.proc.poll() is None, self.proc.communicate()[1]
            assert time.monotonic() < deadline, "dumpcap did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def connections_closed(self) -> int:
        """Stop; how many connections the server ended (count_server_ends)."""
        self.stop()
        fields = ["-T", "fields", "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "tcp.flags"]
        rows = bedlib.run(["tshark", "-n", "-r", str(self.path), *fields], timeout=60).stdout
        return count_server_ends(row.split() for row in rows.splitlines())


def count_server_ends(segments: Iterable[list[str]]) -> int:
    """Connections whose first FIN or RST came from port 53, given each captured segment's
    source port, destination port and TCP flags (hex), in capture order."""
    syns: dict[str, int] = {}  # client port -> SYNs it sent so far
    first_end: dict[tuple[str, int], str] = {}  # (client port, its SYN count) -> who ended
    for src, dst, flags_hex in segments:
        flags = int(flags_hex, 16)
        from_server = src == "53"
        client = dst if from_server else src
        if flags & TCP_SYN:
            if not from_server:
                syns[client] = syns.get(client, 0) + 1
            continue
        first_end.setdefault((client, syns.get(client, 0)), "server" if from_server else "client")
    return sum(ender == "server" for ender in first_end.values())


def _server_connections(bed: bedlib.Bed) -> int:
    """dnsmasq's established TCP connections."""
    listed = bed.run_srv(["ss", "-Htn", "state", "established", "( sport = :53 )"], timeout=10)
    return len(listed.stdout.splitlines())


def _dnsperf_summary(output: str) -> dict[str, int]:
    counts = {
        key: int(value)
        for key, value in re.findall(r"Queries (sent|completed|lost):\s+(\d+)", output)
    }
    codes = re.search(r"Response codes:\s+(.*)", output)
    assert codes, output
    counts.update({code: int(n) for code, n in re.findall(r"([A-Z]+) (\d+) \(", codes.group(1))})
    return counts


def test_dnsperf_full_rate_against_dnsmasq_closing_tcp_after_100_queries(
    dns_bed: bedlib.Bed,
) -> None:
    artifacts = RUN_DIR / "dnsperf"
    artifacts.mkdir(parents=True, exist_ok=True)
    queries = artifacts / "queries.txt"
    queries.write_text("".join(f"q{i}.{dnsbed.ZONE_NAME} A\n" for i in range(NAMES)))
    t2s = dns_bed.start_tun2socks(
        artifacts / "tun2socks.log",
        extra={"dns": {"cache": {"size": 0}}},  # every query goes to dnsmasq
    )
    closes = ServerCloses(dns_bed, artifacts / "server-closes.pcapng")
    try:
        perf = dns_bed.run_cli(
            [
                "dnsperf",
                "-s",
                bedlib.TARGET_IP,
                "-q",
                str(OUTSTANDING),
                "-d",
                str(queries),
                "-l",
                str(LOAD_SECONDS),
            ],
            timeout=LOAD_SECONDS + 60,
        )
        (artifacts / "dnsperf.out").write_text(perf.stdout + perf.stderr)
        assert perf.returncode == 0, perf.stdout + perf.stderr
        # A close is followed by a reconnect when a query comes: ask until the server holds an
        # open connection (the last query may have been a connection's 100th).
        for attempt in range(3):
            dig = dns_bed.run_cli(
                [
                    "dig",
                    f"@{bedlib.TARGET_IP}",
                    "+time=5",
                    "+tries=1",
                    f"last{attempt}.{dnsbed.ZONE_NAME}",
                ],
                timeout=30,
            )
            assert "status: NOERROR" in dig.stdout, dig.stdout
            time.sleep(0.5)
            if _server_connections(dns_bed) == 1:
                break
        assert _server_connections(dns_bed) == 1
        closed = closes.connections_closed()
    finally:
        closes.stop()
    assert dns_bed.stop_tun2socks() == 0
    summary = _dnsperf_summary(perf.stdout)
    assert summary["sent"] >= 20 * 100, perf.stdout  # a load that makes dnsmasq close often
    assert summary.get("SERVFAIL", 0) == 0, perf.stdout
    assert summary["lost"] == 0 and summary["completed"] == summary["NOERROR"], perf.stdout
    log = t2s.log_text()
    assert "socket.send() raised exception" not in log
    assert not [line for line in log.splitlines() if " asyncio" in line], log[-3000:]
    stopping = next(ln for ln in reversed(log.splitlines()) if "dns forwarder stopping" in ln)
    stats = {k: int(v) for k, v in re.findall(r" (\w+)=(\d+)", stopping)}
    assert closed >= 20, (closed, summary)
    assert stats["tcp_server_closes"] == stats["tcp_reconnects"] == closed, (stats, closed)
    assert stats["servfail"] == 0 and stats["upstream_failures"] == 0, stats
