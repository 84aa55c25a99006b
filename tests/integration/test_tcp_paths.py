"""The TCP stack on paths less perfect than the bed's loopback-like link (issue 12): a client
that stops reading, a client with a smaller MSS, a narrower hop that answers with ICMP
"fragmentation needed", an idle connection, a narrow link that drops.

The client runs `tcpcheck.py` (a socket client that reports TCP_INFO) in the client namespace
or, for a path with a hop, in a third namespace `app` routed through the client namespace:

    app ns  veth-app 198.18.253.2 ==veth== 198.18.253.1 veth-fwd   client ns (forwards)
                                                        t2s0 (TUN) -> tun2socks -> danted
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.integration import bed as bedlib
from tests.integration import httpserver

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
]

APP_IP, FWD_IP = "198.18.253.2", "198.18.253.1"
MIB = 1 << 20


def tcpcheck(prefix: list[str], *args: str, timeout: float) -> dict[str, object]:
    proc = bedlib.run(
        [*prefix, *bedlib.helper_command("tcpcheck"), *args], timeout=timeout + 30, check=False
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"tcpcheck: rc {proc.returncode}: {proc.stderr[-500:]}"
    answer: dict[str, object] = json.loads(lines[-1])
    return answer


def target(*args: str) -> list[str]:
    return ["--host", bedlib.TARGET_IP, "--port", str(bedlib.HTTP_PORT), *args]


@pytest.fixture
def app_ns(bed: bedlib.Bed) -> Iterator[list[str]]:
    """A namespace behind the client namespace (which forwards between it and the TUN); the
    command prefix to run in it.  Removed afterwards, even on failure."""
    ns = f"t2sc-{os.getpid()}-77"  # the bed's name pattern: a killed run's copy gets reaped
    bedlib.run(["ip", "netns", "add", ns], timeout=10)
    try:
        pair = ["veth-fwd", "netns", bed.cli_ns, "type", "veth"]
        bedlib.run(
            ["ip", "link", "add", *pair, "peer", "name", "veth-app", "netns", ns], timeout=10
        )
        cli = ["ip", "-n", bed.cli_ns]
        app = ["ip", "-n", ns]
        bedlib.run([*cli, "addr", "add", f"{FWD_IP}/24", "dev", "veth-fwd"], timeout=10)
        bedlib.run([*app, "addr", "add", f"{APP_IP}/24", "dev", "veth-app"], timeout=10)
        for prefix, dev in ((cli, "veth-fwd"), (app, "veth-app"), (app, "lo")):
            bedlib.run([*prefix, "link", "set", dev, "up"], timeout=10)
        bedlib.run([*app, "route", "add", "default", "via", FWD_IP], timeout=10)
        bed.run_cli(["sysctl", "-qw", "net.ipv4.ip_forward=1"], timeout=10, check=True)
        yield ["ip", "netns", "exec", ns]
    finally:
        bed.run_cli(["ip", "link", "del", "veth-fwd"], timeout=10)
        bedlib.run(["ip", "netns", "del", ns], timeout=10, check=False)


# ---------------------------------------------------------------- item 3: zero window


def test_client_that_stops_reading_keeps_its_flow_and_gets_every_byte(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks
) -> None:
    """RFC 9293 3.8.6.1: the client's window stays 0 for 75 s (its buffer full, it answers
    the persist probes); then it reads everything.  (Kept to 75 s: the unit test
    test_zero_window_for_ten_minutes_... covers ten minutes with a stepped clock.)"""
    size = 4 * MIB
    answer = tcpcheck(
        bed.cli_prefix(), "stall", *target("--size", str(size), "--seconds", "75"), timeout=60
    )
    assert "error" not in answer, answer
    assert answer["bytes"] == size
    assert answer["sha256"] == httpserver.payload_sha256(size)


# ---------------------------------------------------------------- item 4: the client's MSS


def rx_packets(prefix: list[str], dev: str) -> int:
    proc = bedlib.run([*prefix, "ip", "-s", "-j", "link", "show", dev], timeout=10)
    return int(json.loads(proc.stdout)[0]["stats64"]["rx"]["packets"])


def test_client_mss_1200_gets_segments_of_at_most_1200_bytes(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, app_ns: list[str]
) -> None:
    """RFC 9293 3.7.1: with offloads on (the default), our super-packets are cut at the
    client's MSS (advmss 1200 on its route), not at the TUN's MTU.  A tbf qdisc on the hop
    makes the kernel cut them (at the gso_size we wrote) into packets the app's veth counts:
    at least one per 1200 bytes."""
    app = ["ip", "-n", app_ns[-1]]
    bedlib.run([*app, "route", "replace", "default", "via", FWD_IP, "advmss", "1200"], timeout=10)
    shape = ["tc", "qdisc", "add", "dev", "veth-fwd", "root", "tbf"]
    bed.run_cli([*shape, "rate", "1gbit", "burst", "1600", "limit", "1mb"], timeout=10, check=True)
    size = 8 * MIB
    before = rx_packets(app_ns, "veth-app")
    answer = tcpcheck(app_ns, "get", *target("--size", str(size)), timeout=60)
    assert "error" not in answer, answer
    assert answer["sha256"] == httpserver.payload_sha256(size)
    assert rx_packets(app_ns, "veth-app") - before >= size // 1200


# ---------------------------------------------------------------- item 5: path MTU


def test_narrower_hop_answers_frag_needed_and_the_download_completes(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, app_ns: list[str]
) -> None:
    """RFC 1191: the client namespace forwards to the app over a 1300-byte hop while the
    app announces MSS 1460; our 1500-byte DF packets are refused there with ICMP
    "fragmentation needed", which must lower the flow's MSS."""
    bed.run_cli(["ip", "link", "set", "veth-fwd", "mtu", "1300"], timeout=10, check=True)
    answer = tcpcheck(app_ns, "get", *target("--size", str(4 * MIB)), timeout=30)
    assert "error" not in answer, answer
    assert answer["sha256"] == httpserver.payload_sha256(4 * MIB)


# ---------------------------------------------------------------- item 6: idle flows


def test_idle_connection_survives_past_the_idle_timeout_by_keepalives(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    """RFC 5382 REQ-5: after timeouts.idle (here 2 s) the stack probes every second; the
    client's kernel answers, so a connection silent for 12 s still works."""
    start_tun2socks(extra={"timeouts": {"idle": 2.0, "keepalive_interval": 1.0}})
    answer = tcpcheck(bed.cli_prefix(), "idle-get", *target("--seconds", "12"), timeout=20)
    assert "error" not in answer, answer
    assert answer["body"] == httpserver.SMALL_BODY.decode()


# ---------------------------------------------------------------- item 7: a narrow link


def test_download_over_a_narrow_dropping_link_completes(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, app_ns: list[str]
) -> None:
    """RFC 5681: a 20 Mbit/s hop with a 30 KB queue drops what the congestion window
    overshoots; the flow recovers, every byte arrives, and little is sent twice."""
    shape = ["tc", "qdisc", "add", "dev", "veth-fwd", "root", "tbf"]
    shape += ["rate", "20mbit", "burst", "16kb", "limit", "30kb"]
    bed.run_cli(shape, timeout=10, check=True)
    size = 8 * MIB  # 3.4 s at 20 Mbit/s
    answer = tcpcheck(app_ns, "get", *target("--size", str(size)), timeout=40)
    assert "error" not in answer, answer
    assert answer["sha256"] == httpserver.payload_sha256(size)
    # What the hop passed on: the data, headers and the retransmissions.  Without a
    # congestion window each timeout resent whole windows into the full queue (2.4 times
    # the data measured); with one, a few percent.
    stats = bed.run_cli(["tc", "-s", "-j", "qdisc", "show", "dev", "veth-fwd"], timeout=10)
    assert json.loads(stats.stdout)[0]["bytes"] <= size * 1.25
