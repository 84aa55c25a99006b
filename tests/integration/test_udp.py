"""UDP, ICMP and fragments through tun2socks end to end, in the bed's namespaces.

UDP goes through danted's UDP ASSOCIATE to a UDP echo server (udptool.py serve) on the target
addresses; microsocks stands for a proxy without UDP. `ping` is answered by tun2socks itself.
The client kernel's IP counters (nstat) prove that fragments crossed the TUN both ways: the
client fragments what it sends (we reassemble), and reassembles what we fragmented.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.integration import bed as bedlib
from tests.integration import dnsbed
from tests.integration.udpclient import udptool

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
]

ECHO_PORT, OTHER_PORT = bedlib.UDP_ECHO_PORTS
TARGETS = {4: bedlib.TARGET_IP, 6: bedlib.TARGET_IP6}
MICROSOCKS_URL = f"socks5://{bedlib.SRV_VETH_IP}:{bedlib.MICROSOCKS_PORT}"


def needs(command: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        bedlib.which(command) is None, reason=f"needs {command} (Debian package {package})"
    )


@pytest.fixture
def udp_bed(bed: bedlib.Bed) -> bedlib.Bed:
    bed.start_optional_servers(udp_echo=True)
    return bed


def ip_counters(bed: bedlib.Bed) -> dict[str, int]:
    """The client namespace's fragmentation counters (absolute values)."""
    names = ["IpFragOKs", "IpReasmOKs", "Ip6FragOKs", "Ip6ReasmOKs"]
    proc = bed.run_cli(["nstat", "-az", "--json", *names], timeout=10, check=True)
    counters: dict[str, int] = json.loads(proc.stdout)["kernel"]
    return {name: int(counters.get(name, 0)) for name in names}


@pytest.mark.parametrize("version", [4, 6])
def test_udp_echo_100_datagrams_up_to_8_kib_with_fragments(
    udp_bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, version: int
) -> None:
    before = ip_counters(udp_bed)
    result = udptool(udp_bed, "echo", TARGETS[version], str(ECHO_PORT), "--count", "100")
    after = ip_counters(udp_bed)
    assert result["matched"] == 100, result
    assert result["mismatched"] == 0 and result["lost"] == 0, result
    assert result["retries"] <= 3, result  # a loaded machine may lose one now and then
    prefix = "Ip" if version == 4 else "Ip6"
    # The client cut its large datagrams (so tun2socks reassembled them) and put together
    # the large replies (which tun2socks fragmented to the TUN's MTU).
    assert after[f"{prefix}FragOKs"] > before[f"{prefix}FragOKs"], (before, after)
    assert after[f"{prefix}ReasmOKs"] > before[f"{prefix}ReasmOKs"], (before, after)


@pytest.mark.parametrize("version", [4, 6])
def test_replies_from_a_second_remote_port_reach_the_client(
    udp_bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, version: int
) -> None:
    """Endpoint-independent mapping: the client wrote to ECHO_PORT only; the server answers
    from OTHER_PORT, a peer the client never wrote to."""
    result = udptool(udp_bed, "other-port", TARGETS[version], str(ECHO_PORT), "--timeout", "10")
    assert [OTHER_PORT, "OTHER mapping check"] in result["replies"], result


def associations(bed: bedlib.Bed) -> int:
    """TCP connections from the client namespace to danted: one control connection per UDP
    association (no TCP flow runs in these tests)."""
    proxy = f"{bedlib.SRV_VETH_IP}:{bedlib.SOCKS_PORT}"
    proc = bed.run_cli(["ss", "-Htn", "state", "established", "dst", proxy], timeout=10)
    return len(proc.stdout.splitlines())


def test_one_association_per_client_socket_closed_when_idle(
    udp_bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    start_tun2socks(extra={"udp": {"idle_timeout": 2.0}})
    for version in (4, 6):  # two client sockets, each writing to two destinations
        result = udptool(udp_bed, "fan-out", TARGETS[version], str(ECHO_PORT), str(OTHER_PORT))
        assert result["answered"] == [ECHO_PORT, OTHER_PORT], result
    assert associations(udp_bed) == 2
    deadline = time.monotonic() + 15.0
    while associations(udp_bed) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert associations(udp_bed) == 0  # idle: closed, and with them the proxy's relays


@needs("ping", "iputils-ping")
@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [56, 4000])  # 4000: fragmented both ways at MTU 1500
def test_ping_through_the_tun_is_answered(
    bed: bedlib.Bed, tun2socks: bedlib.Tun2socks, version: int, size: int
) -> None:
    proc = bed.run_cli(
        [
            "ping",
            f"-{version}",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "-s",
            str(size),
            TARGETS[version],
        ],
        timeout=20,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"3 packets transmitted, 3 received", proc.stdout), proc.stdout
    assert f"{size + 8} bytes from {TARGETS[version]}" in proc.stdout, proc.stdout


@needs("ping", "iputils-ping")
def test_ping_gets_no_answer_when_echo_is_drop(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    start_tun2socks(extra={"icmp": {"echo": "drop"}})
    proc = bed.run_cli(["ping", "-4", "-c", "2", "-W", "1", bedlib.TARGET_IP], timeout=20)
    assert proc.returncode != 0
    assert "2 packets transmitted, 0 received" in proc.stdout, proc.stdout


@needs("iperf3", "iperf3")
def test_iperf3_udp_loss_under_one_percent(bed: bedlib.Bed, tun2socks: bedlib.Tun2socks) -> None:
    bed.start_optional_servers(iperf=True)
    args = ["iperf3", "-c", bedlib.TARGET_IP, "-p", str(bedlib.IPERF_PORT), "-u", "-b", "50M"]
    # -w: iperf3 sizes the receiving server's socket buffer too; the default (208 KiB) holds
    # only ~40 ms of this stream, and a loaded machine can keep iperf3 off the CPU longer.
    options = ["-t", "3", "-J", "-w", "4M", "--connect-timeout", "5000"]
    proc = bed.run_cli([*args, *options], timeout=60)
    report = json.loads(proc.stdout)
    assert "error" not in report, report["error"]
    total = report["end"]["sum"]
    assert total["packets"] > 10_000, total  # about 50 Mbit/s for 3 s really went out
    assert total["lost_percent"] < 1.0, total


@needs("microsocks", "microsocks")
def test_proxy_without_udp_associate_refuses_udp_at_once_and_dns_still_works(
    dns_bed: bedlib.Bed, start_dns_tun2socks: bedlib.StartTun2socks
) -> None:
    dns_bed.start_optional_servers(microsocks=True, udp_echo=True)
    extra = {
        # microsocks reads one handshake message per recv(): no pipelining
        "proxy": {"url": MICROSOCKS_URL, "pipeline": False},
        "dns": {"upstreams": [f"tcp://{bedlib.TARGET_IP}"], "timeout": 5.0},
    }
    t2s = start_dns_tun2socks(extra=extra)
    try:
        for version in (4, 6, 4):
            started = time.monotonic()
            result = udptool(dns_bed, "refused", TARGETS[version], str(ECHO_PORT), "--timeout", "8")
            assert result["error"] == "ECONNREFUSED", result
            assert time.monotonic() - started < 6.0  # the client's own timeout is 8 s
        warnings = [line for line in t2s.log_text().splitlines() if "UDP is not carried" in line]
        assert len(warnings) == 1, t2s.log_tail()
        assert "command not supported" in warnings[0], warnings
        # DNS to the forwarder is not UDP relayed: it goes upstream over TCP through microsocks.
        dig = ["dig", f"@{dnsbed.CLIENT_RESOLVER}", "+time=5", "+tries=1", dnsbed.ZONE_NAME, "A"]
        out = dns_bed.run_cli(dig, timeout=30).stdout
        assert "status: NOERROR" in out and bedlib.TARGET_IP in out, out + t2s.log_tail()
    finally:
        dns_bed.stop_tun2socks()


@needs("microsocks", "microsocks")
def test_proxy_without_udp_associate_drops_when_configured(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    bed.start_optional_servers(microsocks=True, udp_echo=True)
    start_tun2socks(extra={"proxy": {"url": MICROSOCKS_URL}, "udp": {"when_unsupported": "drop"}})
    result = udptool(bed, "refused", bedlib.TARGET_IP, str(ECHO_PORT), "--timeout", "3")
    assert result["error"] == "timeout", result


def test_udp_disabled_is_refused(
    udp_bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    start_tun2socks(extra={"udp": {"enabled": False}})
    result = udptool(udp_bed, "refused", bedlib.TARGET_IP6, str(ECHO_PORT), "--timeout", "8")
    assert result["error"] == "ECONNREFUSED", result


def test_block_rule_refuses_udp_and_other_destinations_still_work(
    udp_bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks
) -> None:
    rule = {"dst": f"{bedlib.TARGET_IP}/32", "protocol": "udp", "action": "block"}
    start_tun2socks(extra={"rules": [rule]})
    result = udptool(udp_bed, "refused", bedlib.TARGET_IP, str(ECHO_PORT), "--timeout", "8")
    assert result["error"] == "ECONNREFUSED", result
    result = udptool(udp_bed, "fan-out", bedlib.TARGET_IP6, str(ECHO_PORT))
    assert result["answered"] == [ECHO_PORT], result
