"""The DNS forwarder end to end: real dig and curl in the client namespace, a real dnsmasq in the
server namespace that the client can reach only through the SOCKS5 proxy (see dnsbed.py).

The bed of this module has its own namespaces (the ``dns_bed`` fixture): the client's
resolv.conf names 192.0.2.53, an address that exists nowhere, so every name lookup works only if
tun2socks answers it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration import bed as bedlib
from tests.integration import dnsbed, leakcapture
from tests.integration.bedprocs import process_tree

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements(dns=True)),
        reason="needs " + ", ".join(bedlib.missing_requirements(dns=True)),
    ),
]

REPO = Path(__file__).resolve().parents[2]
RESOLVER = dnsbed.CLIENT_RESOLVER
NOWHERE = "203.0.113.9"  # another address that exists nowhere
NOWHERE6 = "fd00:5353::53"
UPSTREAM = f"tcp://{bedlib.TARGET_IP}"
BY_NAME_RULE = re.compile(r"pass\(1\): tcp/connect")  # danted's rule 1: CONNECT to .test by name
URL = f"http://{dnsbed.ZONE_NAME}:{bedlib.HTTP_PORT}/small"
SMALL_BODY = "hello from the tun2socks test server\n"

Start = Callable[..., bedlib.Tun2socks]


@pytest.fixture
def start(start_dns_tun2socks: bedlib.StartTun2socks) -> Start:
    """start(**dns settings) -> tun2socks on the DNS bed with that `dns:` section."""

    def run(proxy: str | None = None, **dns: Any) -> bedlib.Tun2socks:
        extra: dict[str, Any] = {
            "dns": {"timeout": 3.0, "upstream_timeout": 1.5, **dns},
            "log": {"level": "debug"},
        }
        if proxy is not None:
            extra["proxy"] = {"url": proxy}
        return start_dns_tun2socks(extra=extra)

    return run


def dig(bed: bedlib.Bed, *args: str, server: str = RESOLVER, wait: float = 4.0) -> str:
    """dig in the client namespace; its full output (asserts it ran)."""
    cmd = ["dig", f"@{server}", f"+time={wait:g}", "+tries=1", *args]
    proc = bed.run_cli(cmd, timeout=wait + 20)
    assert proc.returncode in (0, 9), f"{cmd}: {proc.returncode} {proc.stderr}"
    return proc.stdout


def answers(output: str) -> list[str]:
    """The rdata of the ANSWER section of a full dig output."""
    section = output.split(";; ANSWER SECTION:\n", 1)
    if len(section) < 2:
        return []
    rows = section[1].split("\n\n", 1)[0].splitlines()
    return [row.split(None, 4)[4] for row in rows if row and not row.startswith(";")]


def status(output: str) -> str:
    match = re.search(r"status: (\w+)", output)
    assert match, output
    return match.group(1)


def stats_at_exit(bed: bedlib.Bed, t2s: bedlib.Tun2socks) -> dict[str, int]:
    """Stop tun2socks; the forwarder's counters from its last log line."""
    assert bed.stop_tun2socks() == 0
    line = next(
        (ln for ln in reversed(t2s.log_text().splitlines()) if "dns forwarder stopping" in ln), ""
    )
    assert line, t2s.log_tail()
    return {k: int(v) for k, v in re.findall(r" (\w+)=(\d+)", line)}


def dnsmasq_queries(bed: bedlib.Bed, name: str, qtype: str) -> list[dnsbed.LoggedQuery]:
    return [
        q
        for q in dnsbed.logged_queries(bed.dns_log_text())
        if q.name.lower() == name.lower() and q.qtype == qtype  # 0x20: mixed case upstream
    ]


def danted_by_name(bed: bedlib.Bed) -> int:
    text = (bed.workdir / "danted-noauth.out").read_text(errors="replace")
    return len(BY_NAME_RULE.findall(text))


def curl(bed: bedlib.Bed, url: str = URL) -> subprocess.CompletedProcess[str]:
    return bed.run_cli(["curl", "-sS", "--max-time", "10", url], timeout=30)


# --- answers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dig_at_any_address_gets_a_aaaa_and_txt(
    dns_bed: bedlib.Bed, start: Start, transport: str
) -> None:
    start(upstreams=[UPSTREAM])
    for server in (RESOLVER, NOWHERE, NOWHERE6):
        a = dig(dns_bed, transport, dnsbed.ZONE_NAME, "A", server=server)
        assert (status(a), answers(a)) == ("NOERROR", [bedlib.TARGET_IP]), a
        assert ("(TCP)" in a) == (transport == "+tcp"), a  # the transport really was used
    aaaa = dig(dns_bed, transport, dnsbed.ZONE_NAME, "AAAA")
    assert answers(aaaa) == [bedlib.TARGET_IP6], aaaa
    txt = dig(dns_bed, transport, dnsbed.ZONE_NAME, "TXT")
    assert answers(txt) == [f'"{dnsbed.TXT_TEXT}"'], txt
    nx = dig(dns_bed, transport, "nope.test")
    assert status(nx) == "NXDOMAIN", nx


def test_default_forwards_to_the_queried_address_through_the_proxy(
    dns_bed: bedlib.Bed, start: Start
) -> None:
    start()  # no upstreams
    before = len(dnsmasq_queries(dns_bed, dnsbed.ZONE_NAME, "TXT"))
    out = dig(dns_bed, dnsbed.ZONE_NAME, "TXT", server=bedlib.TARGET_IP)
    assert answers(out) == [f'"{dnsbed.TXT_TEXT}"'], out
    queries = dnsmasq_queries(dns_bed, dnsbed.ZONE_NAME, "TXT")[before:]
    # dnsmasq was asked by the proxy (its external side is the server namespace's own address)
    assert [q.source for q in queries] == [bedlib.TARGET_IP]
    # a resolver address where no DNS server is: SERVFAIL, fast
    assert status(dig(dns_bed, dnsbed.ZONE_NAME, server=RESOLVER)) == "SERVFAIL"


def test_second_identical_query_is_served_from_cache(dns_bed: bedlib.Bed, start: Start) -> None:
    t2s = start(upstreams=[UPSTREAM])
    before = len(dnsmasq_queries(dns_bed, dnsbed.ZONE_NAME, "A"))
    first = dig(dns_bed, dnsbed.ZONE_NAME)
    time.sleep(1.1)  # so that the cached TTL has visibly counted down
    second = dig(dns_bed, dnsbed.ZONE_NAME)
    assert answers(first) == answers(second) == [bedlib.TARGET_IP]
    ttl = [int(re.findall(r"\s(\d+)\s+IN\s+A\s", out)[0]) for out in (first, second)]
    assert ttl[1] < ttl[0] <= 300, (first, second)
    assert len(dnsmasq_queries(dns_bed, dnsbed.ZONE_NAME, "A")) == before + 1
    stats = stats_at_exit(dns_bed, t2s)
    assert stats["queries"] == 2 and stats["cache_hits"] == 1 and stats["cache_misses"] == 1


def test_servfail_within_the_timeout_when_the_upstream_is_stopped(
    dns_bed: bedlib.Bed, start: Start
) -> None:
    t2s = start(upstreams=[UPSTREAM], timeout=2.0)
    assert answers(dig(dns_bed, dnsbed.ZONE_NAME)) == [bedlib.TARGET_IP]  # connection is up
    # dnsmasq and its children: it serves each TCP connection from one
    dnsmasq = process_tree(dns_bed.dns_server().pid)
    for pid in dnsmasq:
        os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        out = dig(dns_bed, dnsbed.ZONE_NAME, "TXT", wait=10)
        took = time.monotonic() - began
    finally:
        for pid in dnsmasq:
            os.kill(pid, signal.SIGCONT)
    assert status(out) == "SERVFAIL", out
    assert 1.5 <= took < 2.0 + 2.5, took  # the configured timeout, not dig's 10 s
    assert answers(dig(dns_bed, dnsbed.ZONE_NAME, "TXT")) == [f'"{dnsbed.TXT_TEXT}"']
    assert stats_at_exit(dns_bed, t2s)["servfail"] == 1


# --- names for curl ------------------------------------------------------------------------------


def test_curl_by_name_in_forward_mode(dns_bed: bedlib.Bed, start: Start) -> None:
    start(upstreams=[UPSTREAM])
    by_name = danted_by_name(dns_bed)
    proc = curl(dns_bed)
    assert (proc.returncode, proc.stdout) == (0, SMALL_BODY), proc.stderr
    assert danted_by_name(dns_bed) == by_name  # real answers: CONNECT by address


def test_curl_by_name_in_fake_ip_mode_connects_by_name(dns_bed: bedlib.Bed, start: Start) -> None:
    t2s = start(upstreams=[UPSTREAM], mode="fake-ip")
    a = answers(dig(dns_bed, dnsbed.ZONE_NAME))
    aaaa = answers(dig(dns_bed, dnsbed.ZONE_NAME, "AAAA"))
    assert len(a) == len(aaaa) == 1
    assert a[0].startswith("198.18.1") and aaaa[0].startswith("fd00:7f:f::"), (a, aaaa)
    txt = answers(dig(dns_bed, dnsbed.ZONE_NAME, "TXT"))  # other types: real answers
    assert txt == [f'"{dnsbed.TXT_TEXT}"']
    before_a = len(dnsmasq_queries(dns_bed, dnsbed.ZONE_NAME, "A"))
    by_name = danted_by_name(dns_bed)
    proc = curl(dns_bed)
    assert (proc.returncode, proc.stdout) == (0, SMALL_BODY), proc.stderr
    assert danted_by_name(dns_bed) == by_name + 1  # the proxy got ATYP=DOMAINNAME name.test
    # only the proxy resolved the name (danted asks dnsmasq; we never did for A)
    new = dnsmasq_queries(dns_bed, dnsbed.ZONE_NAME, "A")[before_a:]
    assert all(q.source == bedlib.TARGET_IP for q in new)
    stats = stats_at_exit(dns_bed, t2s)
    assert stats["fake_answers"] >= 2 and stats["fake_mappings"] == 2


def test_fake_address_without_a_name_is_refused(dns_bed: bedlib.Bed, start: Start) -> None:
    start(mode="fake-ip", upstreams=[UPSTREAM])
    proc = dns_bed.run_cli(
        ["curl", "-sS", "--max-time", "10", f"http://198.18.128.200:{bedlib.HTTP_PORT}/"],
        timeout=30,
    )
    assert proc.returncode == 7, proc  # connection refused (RST), not a timeout


def test_udp_to_a_fake_address_is_refused_not_relayed(dns_bed: bedlib.Bed, start: Start) -> None:
    t2s = start(mode="fake-ip", upstreams=[UPSTREAM])
    fake = answers(dig(dns_bed, dnsbed.ZONE_NAME))[0]
    script = textwrap.dedent(
        f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.connect(("{fake}", 443))
        s.send(b"quic?")
        try:
            s.recv(100)
            print("answered")
        except ConnectionRefusedError:
            print("refused")
        """
    )
    proc = dns_bed.run_cli(["python3", "-c", script], timeout=20)
    assert proc.stdout.strip() == "refused", proc  # ICMP port unreachable, at once
    stats = stats_at_exit(dns_bed, t2s)
    assert stats["fake_udp_refused"] == 1


@pytest.mark.parametrize(
    ("stop", "persist"), [("sigterm", True), ("sigkill", True), ("sigterm", False)]
)
def test_fake_ip_mapping_survives_a_restart_and_the_proxy_sees_the_name(
    dns_bed: bedlib.Bed, start: Start, artifact_dir: Path, stop: str, persist: bool
) -> None:
    """Issue 15, build 4: resolve in fake-ip mode, restart tun2socks (a clean stop, or a
    SIGKILL after the batched write), connect to the fake address: danted gets the name
    (ATYP=DOMAINNAME). The control, without persistence: the address means nothing now."""
    artifacts = artifact_dir
    state = artifacts / "state"
    extra = {
        "dns": {"mode": "fake-ip", "upstreams": [UPSTREAM], "fake_persist": persist},
        "route": {"state_dir": str(state)},
        "log": {"level": "debug"},
    }
    first = dns_bed.start_tun2socks(artifacts / "tun2socks-0.log", extra=extra)
    fake = answers(dig(dns_bed, dnsbed.ZONE_NAME))[0]
    assert fake.startswith("198.18.1"), fake
    if stop == "sigkill":
        store = next(iter(state.glob("*.fakeip")), None) if persist else None
        deadline = time.monotonic() + 10  # the batched write comes within 2 s
        while store is None or dnsbed.ZONE_NAME not in store.read_text():
            assert time.monotonic() < deadline, "no batched write of the new mapping"
            time.sleep(0.2)
            store = next(iter(state.glob("*.fakeip")), None)
        first.process.kill()
        first.process.wait(10)
    else:
        assert dns_bed.stop_tun2socks() == 0
    second = dns_bed.start_tun2socks(artifacts / "tun2socks-1.log", extra=extra)
    by_name = danted_by_name(dns_bed)
    proc = curl(dns_bed, f"http://{fake}:{bedlib.HTTP_PORT}/small")
    if persist:
        assert (proc.returncode, proc.stdout) == (0, SMALL_BODY), proc.stderr
        assert danted_by_name(dns_bed) == by_name + 1  # CONNECT name.test, by name
        assert "restored 1 fake-IP mappings" in second.log_text()
    else:
        assert proc.returncode == 7, proc  # refused: no name for that address any more
        assert danted_by_name(dns_bed) == by_name
        assert list(state.glob("*.fakeip")) == []


# --- DNS over HTTPS ------------------------------------------------------------------------------


def test_doh_upstream_through_the_proxy(dns_bed: bedlib.Bed, start: Start) -> None:
    certs = dnsbed.make_certificates(
        dns_bed.workdir / "doh-certs", names=[dnsbed.DOH_NAME], addresses=[bedlib.TARGET_IP]
    )
    dns_bed.start_doh_server(certs.cert_file, certs.key_file)
    by_name = danted_by_name(dns_bed)
    t2s = start(upstreams=[f"https://{dnsbed.DOH_NAME}/dns-query"], ca_file=str(certs.ca_file))
    out = dig(dns_bed, dnsbed.ZONE_NAME, "TXT", wait=8)
    assert answers(out) == [f'"{dnsbed.TXT_TEXT}"'], out + t2s.log_tail()
    assert answers(dig(dns_bed, dnsbed.ZONE_NAME, "AAAA")) == [bedlib.TARGET_IP6]
    assert f"doh query {dnsbed.ZONE_NAME} TXT" in dns_bed.doh_log_text()
    assert danted_by_name(dns_bed) == by_name + 1  # one TLS connection to doh.test, reused


def test_doh_with_an_untrusted_certificate_fails(dns_bed: bedlib.Bed, start: Start) -> None:
    certs = dnsbed.make_certificates(
        dns_bed.workdir / "doh-certs", names=[dnsbed.DOH_NAME], addresses=[bedlib.TARGET_IP]
    )
    dns_bed.start_doh_server(certs.cert_file, certs.key_file)
    t2s = start(upstreams=[f"https://{dnsbed.DOH_NAME}/dns-query"], timeout=2.0)  # no ca_file
    assert status(dig(dns_bed, "untrusted.test", wait=8)) == "SERVFAIL"
    assert "certificate" in t2s.log_text().lower()


# --- truncation, other upstreams -----------------------------------------------------------------


def test_big_answer_truncated_over_udp_then_complete_over_tcp(
    dns_bed: bedlib.Bed, start: Start
) -> None:
    t2s = start(upstreams=[UPSTREAM])
    out = dig(dns_bed, "+noedns", "+notcp", "+ignore", dnsbed.BIG_NAME, "TXT")
    assert " tc" in out.split("flags:")[1].split(";")[0] and answers(out) == [], out
    out = dig(dns_bed, "+noedns", "+notcp", dnsbed.BIG_NAME, "TXT")  # dig retries over TCP
    assert "Truncated, retrying in TCP mode" in out
    assert len(answers(out)) == dnsbed.BIG_TXT_COUNT, out
    stats = stats_at_exit(dns_bed, t2s)
    assert stats["truncated"] == 2 and stats["tcp_queries"] == 1


def test_direct_upstream_retries_a_truncated_udp_answer_over_tcp(
    dns_bed: bedlib.Bed, start: Start
) -> None:
    # 198.18.0.2 is the one address the client namespace reaches without the TUN
    t2s = start(upstreams=[f"direct://{bedlib.SRV_VETH_IP}"])
    before = len(dnsmasq_queries(dns_bed, dnsbed.BIG_NAME, "TXT"))
    out = dig(dns_bed, "+tcp", dnsbed.BIG_NAME, "TXT")
    assert len(answers(out)) == dnsbed.BIG_TXT_COUNT, out
    queries = dnsmasq_queries(dns_bed, dnsbed.BIG_NAME, "TXT")[before:]
    assert [q.source for q in queries] == [bedlib.CLI_VETH_IP] * 2  # UDP, then TCP
    assert stats_at_exit(dns_bed, t2s)["tcp_retries"] == 1


def test_udp_upstream_through_udp_associate(dns_bed: bedlib.Bed, start: Start) -> None:
    t2s = start(upstreams=[f"udp://{bedlib.TARGET_IP}"])
    before = len(dnsmasq_queries(dns_bed, dnsbed.ZONE_NAME, "TXT"))
    out = dig(dns_bed, dnsbed.ZONE_NAME, "TXT")
    assert answers(out) == [f'"{dnsbed.TXT_TEXT}"'], out + t2s.log_tail()
    (asked,) = dnsmasq_queries(dns_bed, dnsbed.ZONE_NAME, "TXT")[before:]
    assert asked.source == bedlib.TARGET_IP
    big_before = len(dnsmasq_queries(dns_bed, dnsbed.BIG_NAME, "TXT"))
    big = dig(dns_bed, "+tcp", dnsbed.BIG_NAME, "TXT")
    assert len(answers(big)) == dnsbed.BIG_TXT_COUNT, big
    # 0x20 (draft-vixie-dnsext-dns0x20): names go out over UDP in random case and dnsmasq's
    # answers, spelled the same, are accepted; the 15 letters of the two UDP questions are all
    # lower case once in 2**15 runs.
    (big_udp, _big_tcp) = dnsmasq_queries(dns_bed, dnsbed.BIG_NAME, "TXT")[big_before:]
    assert any(q.name != q.name.lower() for q in (asked, big_udp)), (asked, big_udp)
    stats = stats_at_exit(dns_bed, t2s)
    assert stats["tcp_retries"] == 1 and stats["upstream_failures"] == 0


def test_static_hosts_and_malformed_queries(dns_bed: bedlib.Bed, start: Start) -> None:
    t2s = start(upstreams=[UPSTREAM], hosts={"printer.lan": ["192.0.2.80", "fd00::80"]})
    assert answers(dig(dns_bed, "printer.lan")) == ["192.0.2.80"]
    assert answers(dig(dns_bed, "printer.lan", "AAAA")) == ["fd00::80"]
    script = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); "
        f"s.sendto(bytes.fromhex('abcd01000001000000000000ff'), ('{RESOLVER}', 53)); "
        "print(s.recv(512).hex())"
    )
    proc = dns_bed.run_cli(["python3", "-c", script], timeout=20)
    reply = bytes.fromhex(proc.stdout.strip())
    assert reply[:2] == b"\xab\xcd" and reply[3] & 0x0F == 1, proc  # FORMERR, same ID
    stats = stats_at_exit(dns_bed, t2s)
    assert stats["formerr"] == 1 and stats["hosts_answers"] == 2


# --- no leak -------------------------------------------------------------------------------------


def dns_capture(bed: bedlib.Bed) -> leakcapture.UplinkCapture:
    """tshark on the client namespace's veth (its only way out besides the TUN): each UDP or TCP
    packet to or from port 53 (and the capture's markers, which finish() leaves out)."""
    bpf = f"port 53 or udp port {leakcapture.MARKER_PORT}"
    return leakcapture.UplinkCapture(bed, capture_filter=bpf)


def test_no_query_leaves_the_client_namespace_except_through_the_proxy(
    dns_bed: bedlib.Bed, start: Start
) -> None:
    start(mode="fake-ip", upstreams=[UPSTREAM])
    sources_before = len(dnsbed.logged_queries(dns_bed.dns_log_text()))
    capture = dns_capture(dns_bed)
    try:
        for server in (RESOLVER, bedlib.TARGET_IP, NOWHERE6):
            for transport in ("+notcp", "+tcp"):
                for qtype in ("A", "AAAA", "TXT"):
                    assert answers(dig(dns_bed, transport, dnsbed.ZONE_NAME, qtype, server=server))
        assert curl(dns_bed).stdout == SMALL_BODY
        assert capture.finish() == []
    finally:
        capture.stop()
    # The control: a query sent around the TUN shows in the same kind of capture.
    control = dns_capture(dns_bed)
    try:
        assert answers(dig(dns_bed, dnsbed.ZONE_NAME, server=bedlib.SRV_VETH_IP))
        packets = control.finish()
        assert len(packets) == 2 and all("53" in (p.src_port, p.dst_port) for p in packets), packets
    finally:
        control.stop()
    sources = {q.source for q in dnsbed.logged_queries(dns_bed.dns_log_text())[sources_before:]}
    assert bedlib.CLI_VETH_IP in sources  # the control query, directly from the client
    sources.discard(bedlib.CLI_VETH_IP)
    assert sources == {bedlib.TARGET_IP}  # everything else came from the proxy
