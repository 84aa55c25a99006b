"""The bypass mode (`proxy.url: direct://`) in the namespace bed, with no SOCKS5 server anywhere.

The bed's Dante servers are stopped first: every flow, datagram and DNS upstream query leaves the
client namespace on a protected socket of tun2socks itself. tun2socks runs with `route.auto` and
`route.mark` (or `route.bind_interface`), and the client namespace has a default route via the
server's veth (`set_uplink`), the path that marked sockets take (the `fwmark` rule) while every
other packet goes into the TUN. The HTTP server's /peer shows where a connection came from: the
client's veth address, as if tun2socks were not there; dnsmasq's log shows the same for DNS.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import bed as bedlib
from tests.integration import dnsbed, httpserver
from tests.integration.udpclient import udptool

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements(dns=True)),
        reason="needs " + ", ".join(bedlib.missing_requirements(dns=True)),
    ),
]

MARK = 0x2A
TARGETS = {4: bedlib.TARGET_IP, 6: bedlib.TARGET_IP6}
UPLINK_ADDRESSES = {4: bedlib.CLI_VETH_IP, 6: bedlib.CLI_VETH_IP6}
ECHO_PORT = bedlib.UDP_ECHO_PORTS[0]
SOCKS_PORTS = (bedlib.SOCKS_PORT, bedlib.SOCKS_AUTH_PORT)

Start = Callable[..., bedlib.Tun2socks]


def http_url(version: int, path: str) -> str:
    host = TARGETS[version] if version == 4 else f"[{TARGETS[version]}]"
    return f"http://{host}:{bedlib.HTTP_PORT}{path}"


def curl(bed: bedlib.Bed, url: str, *args: str, max_time: float = 10.0) -> Any:
    command = ["curl", "-sS", "-g", "--max-time", str(max_time), *args, url]
    return bed.run_cli(command, timeout=max_time + 10)


@pytest.fixture(scope="module")
def bypass_bed(dns_bed: bedlib.Bed) -> Iterator[bedlib.Bed]:
    """The DNS bed without its SOCKS5 servers, with an uplink and the UDP echo server."""
    dns_bed.start_optional_servers(udp_echo=True)  # first: it fails if any server has exited
    for name in ("danted-noauth", "danted-auth"):  # started by this module's bed: ours to stop
        pid_file = dns_bed.workdir / f"{name}.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while set(SOCKS_PORTS) & dns_bed.listening_ports():
        assert time.monotonic() < deadline, "danted did not stop"
        time.sleep(0.1)
    dns_bed.set_uplink(True)
    set_server_source(dns_bed, TARGETS)
    try:
        yield dns_bed
    finally:
        set_server_source(dns_bed, {4: bedlib.SRV_VETH_IP, 6: bedlib.SRV_VETH_IP6})
        dns_bed.set_uplink(False)


def set_server_source(bed: bedlib.Bed, sources: dict[int, str]) -> None:
    """The source address the server namespace gives its packets to the client's uplink.

    The UDP echo server answers from a wildcard socket, so its replies leave from the address
    the route back names. Through a proxy next to it that is the target itself; a direct reply
    to the client's veth would leave from the server's veth address, and the client's
    connected socket would drop it. With the target as source the server looks like a host
    on the Internet with one address."""
    # The kernel's own routes to the veth's prefixes, changed in place (same metric).
    for version, net, metric in ((4, "198.18.0.0/24", "0"), (6, "fd00:c8::/64", "256")):
        route = ["route", "replace", net, "dev", bedlib.SRV_VETH, "metric", metric]
        route += ["proto", "kernel", "src", sources[version]]
        bed.run_srv(["ip", f"-{version}", *route], timeout=10, check=True)


@pytest.fixture
def start(
    bypass_bed: bedlib.Bed, start_dns_tun2socks: bedlib.StartTun2socks, artifact_dir: Path
) -> Start:
    """start(**extra) -> tun2socks with direct://, route.auto and route.mark (unless `route`
    says otherwise), debug log; SOCKS5 is checked to be absent each time."""

    def run(route: dict[str, Any] | None = None, **extra: Any) -> bedlib.Tun2socks:
        assert not set(SOCKS_PORTS) & bypass_bed.listening_ports()
        settings: dict[str, Any] = {
            "proxy": {"url": "direct://"},
            "route": {"auto": True, "state_dir": str(artifact_dir / "state"), "mark": MARK},
            "log": {"level": "debug"},
            **extra,
        }
        settings["route"].update(route or {})
        return start_dns_tun2socks(routes=False, extra=settings)

    return run


def connections_to(t2s: bedlib.Tun2socks, target: str) -> int:
    return t2s.log_text().count(f"-> {target}: connected through direct")


# --- TCP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("way", ["mark", "bind_interface"])
def test_route_auto_with_a_protected_socket_curl_v4_v6_no_loop_server_sees_the_uplink(
    bypass_bed: bedlib.Bed, start: Start, way: str
) -> None:
    route = {"mark": MARK} if way == "mark" else {"mark": 0, "bind_interface": bedlib.CLI_VETH}
    t2s = start(route=route)
    # The start-up summary: no proxy, so nothing to probe and nothing missing.
    assert "no proxy: direct:// (each flow goes out from a socket of its own)" in t2s.log_text()
    assert "UDP: yes (directly" in t2s.log_text() and "probe" not in t2s.log_text()
    rules = bypass_bed.run_cli(["ip", "rule"], timeout=10).stdout
    assert (f"fwmark {MARK:#x} lookup main" in rules) == (way == "mark"), rules
    for version in (4, 6):
        proc = curl(bypass_bed, http_url(version, "/peer"))
        assert proc.returncode == 0, proc.stderr
        # The server sees the client's own uplink address: no proxy in between.
        assert proc.stdout.strip() == UPLINK_ADDRESSES[version]
        # The client's connection went through the TUN (one flow, relayed directly) and
        # tun2socks' own socket did not come back into it: exactly one flow per request.
        target = f"{TARGETS[version] if version == 4 else f'[{TARGETS[version]}]'}:8080"
        assert connections_to(t2s, target) == 1, t2s.log_tail()
    assert t2s.stop() == 0


def test_100_mib_download_arrives_intact(bypass_bed: bedlib.Bed, start: Start) -> None:
    size = 100 * 1024 * 1024
    start()
    url = http_url(4, f"/bytes/{size}")
    pipeline = f"curl -sS --max-time 120 {url} | sha256sum"
    proc = bypass_bed.run_cli(["bash", "-o", "pipefail", "-c", pipeline], timeout=150)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == httpserver.payload_sha256(size)


def test_block_rule_answers_with_rst_and_the_rest_goes_direct(
    bypass_bed: bedlib.Bed, start: Start
) -> None:
    """A packet filter: `block` for IPv4 port 8080 only; curl sees the RST (exit 7, "could not
    connect"), at once, while IPv6 to the same port goes out directly."""
    t2s = start(rules=[{"dst": f"{bedlib.TARGET_IP}/32", "port": 8080, "action": "block"}])
    began = time.monotonic()
    blocked = curl(bypass_bed, http_url(4, "/peer"))
    assert blocked.returncode == 7, (blocked.returncode, blocked.stderr)
    assert time.monotonic() - began < 5  # refused, not timed out
    assert "blocked by rule 0" in t2s.log_text()
    allowed = curl(bypass_bed, http_url(6, "/peer"))
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == bedlib.CLI_VETH_IP6


# --- UDP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_udp_echo_goes_direct(bypass_bed: bedlib.Bed, start: Start, version: int) -> None:
    t2s = start()
    result = udptool(bypass_bed, "echo", TARGETS[version], str(ECHO_PORT), "--count", "50")
    assert result["matched"] == 50, result
    assert result["mismatched"] == 0 and result["lost"] <= 2, result
    # Endpoint-independent, as through a proxy: a reply from a port never written to arrives.
    other = udptool(bypass_bed, "other-port", TARGETS[version], str(ECHO_PORT), "--timeout", "10")
    assert [bedlib.UDP_ECHO_PORTS[1], "OTHER mapping check"] in other["replies"], other
    log = t2s.log_text()
    assert "associated, relay direct" in log, t2s.log_tail()
    assert "cannot set up UDP" not in log


# --- DNS ------------------------------------------------------------------------------------------


def dig(bed: bedlib.Bed, *args: str, server: str) -> str:
    command = ["dig", f"@{server}", "+time=4", "+tries=1", *args]
    proc = bed.run_cli(command, timeout=30)
    assert proc.returncode == 0, f"{command}: {proc.returncode} {proc.stdout} {proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize(
    "upstream", [None, f"direct://{bedlib.TARGET_IP}", f"udp://{bedlib.TARGET_IP}"]
)
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dig_through_the_forwarder_goes_direct(
    bypass_bed: bedlib.Bed, start: Start, upstream: str | None, transport: str
) -> None:
    """Without dns.upstreams a query goes to its own destination; with a direct:// or udp://
    upstream there. Either way from the client's uplink address, as dnsmasq logs it."""
    dns: dict[str, Any] = {"timeout": 3.0, "upstream_timeout": 1.5}
    if upstream is not None:
        dns["upstreams"] = [upstream]
    start(dns=dns)
    # With upstreams any address will do (the forwarder takes every query); without, the
    # query's destination is the upstream: the server's.
    server = dnsbed.CLIENT_RESOLVER if upstream else bedlib.TARGET_IP
    scheme = upstream.partition(":")[0] if upstream else "default"
    name = f"{scheme}-{transport[1:]}.bypass.{dnsbed.ZONE_NAME}"
    out = dig(bypass_bed, transport, name, "A", server=server)
    assert "status: NOERROR" in out, out
    assert f"\t{bedlib.TARGET_IP}" in out, out
    queries = [
        q for q in dnsbed.logged_queries(bypass_bed.dns_log_text()) if q.name.lower() == name
    ]
    assert queries, bypass_bed.dns_log_text()[-2000:]
    assert {q.source for q in queries} == {bedlib.CLI_VETH_IP}, queries


def test_exec_runs_one_command_in_the_bypass_mode(bypass_bed: bedlib.Bed) -> None:
    """`tun2socks exec --proxy direct://`: the command's own namespace, whose only way out is
    tun2socks, which sends its flows out from the client namespace: nothing to protect."""
    exec_command = [*bedlib.tun2socks_command(), "exec", "--proxy", "direct://", "--"]
    curls = " ; echo ; ".join(
        f"curl -sS -g --max-time 10 {http_url(version, '/peer')}" for version in (4, 6)
    )
    proc = subprocess.run(
        [*bypass_bed.cli_prefix(), *exec_command, "sh", "-c", curls],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == [UPLINK_ADDRESSES[4], UPLINK_ADDRESSES[6]], proc.stderr


# --- loops ------------------------------------------------------------------------------------


def test_without_protection_a_looping_socket_is_refused_at_once(
    bypass_bed: bedlib.Bed, start_dns_tun2socks: bedlib.StartTun2socks
) -> None:
    """No route.auto and no mark: the bed's own default route sends everything into the TUN,
    tun2socks' direct socket too. Its SYN comes back as a new flow from the port it connects
    from: that flow is refused (RST), so the first fails at once, and there is no runaway."""
    try:
        t2s = start_dns_tun2socks(extra={"proxy": {"url": "direct://"}, "log": {"level": "debug"}})
        began = time.monotonic()
        proc = curl(bypass_bed, http_url(4, "/peer"))
        assert proc.returncode == 7, (proc.returncode, proc.stderr)
        assert time.monotonic() - began < 5
        time.sleep(0.5)  # anything still looping would show more flows now
        log = t2s.log_text()
        assert log.count("a direct connection of tun2socks itself entered the TUN") == 1, log
        assert len(set(re.findall(r"flow (\d+) ", log))) == 2, log
        # UDP has no handshake to stall: each looped datagram would open a session that sends
        # it again, forever. It is dropped: one session (the client's), one warning.
        echo = udptool(
            bypass_bed,
            "echo",
            bedlib.TARGET_IP,
            str(ECHO_PORT),
            "--count",
            "1",
            "--retries",
            "1",
            "--timeout",
            "1",
        )
        assert echo["matched"] == 0, echo
        time.sleep(0.5)
        log = t2s.log_text()
        assert log.count("associated, relay direct") == 1, log
        assert log.count("UDP from tun2socks itself entered the TUN and is dropped") == 1, log
    finally:
        bypass_bed.stop_tun2socks()
        bypass_bed.set_uplink(True)  # the bed's default route into the TUN replaced it


# --- configuration ----------------------------------------------------------------------------


def test_route_auto_without_a_protection_is_refused_in_one_line(
    bypass_bed: bedlib.Bed, tmp_path: Path
) -> None:
    config = tmp_path / "direct.yaml"
    config.write_text('proxy: {url: "direct://"}\nroute: {auto: true}\n')
    proc = subprocess.run(
        [*bypass_bed.cli_prefix(), *bedlib.tun2socks_command(), "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "route: direct:// with route.auto needs route.mark or route.bind_interface" in (
        proc.stderr
    )
