"""The leak audit (route.strict, the kill switch): what leaves the client namespace's uplink.

With route.auto the client namespace has a default route via the server's veth, like the
gateway of a LAN (`set_uplink`), so that a connection around the TUN would work, and show. A
capture on that uplink runs during a workload of everything that tends to slip around a tunnel
(leakload.py) while tun2socks serves, and again after `kill -9` of tun2socks: with
route.strict, nothing but packets to and from the proxy (and the ARP between the client and
the proxy) may show, before and across the next start. Without route.strict the same capture
after `kill -9` shows what leaks: the reason the switch exists.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import bed as bedlib
from tests.integration import leakcapture

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements(dns=True)),
        reason="needs " + ", ".join(bedlib.missing_requirements(dns=True)),
    ),
]

HERE = Path(__file__).resolve().parent
TABLE = 7280
RESOLVER_PREFIX = "198.19.53."  # 20 resolver addresses, .1 to .20: inside the bed, off-link
PROXY, LOCAL = bedlib.SRV_VETH_IP, bedlib.CLI_VETH_IP
TUNNELLED = ("tcp", "tcp6")
MARK = 0x2A  # steps that succeed only through the proxy, or directly


def workload(bed: bedlib.Bed) -> dict[str, str]:
    args = [*bedlib.helper_command("leakload"), bedlib.TARGET_IP, bedlib.TARGET_IP6]
    args += [str(bedlib.HTTP_PORT), RESOLVER_PREFIX]
    proc = bed.run_cli(args, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def audit(bed: bedlib.Bed) -> tuple[dict[str, str], list[leakcapture.Packet]]:
    """Run the workload under a capture of the uplink: its results, and what leaked."""
    capture = leakcapture.UplinkCapture(bed)
    try:
        results = workload(bed)
        packets = capture.finish()
    finally:
        capture.stop()
    return results, leakcapture.leaks(packets, PROXY, LOCAL)


def peer(bed: bedlib.Bed) -> str:
    proc = bed.run_cli(
        ["curl", "-sS", "--max-time", "5", f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}/peer"],
        timeout=20,
    )
    return proc.stdout.strip() if proc.returncode == 0 else f"failed: {proc.stderr.strip()}"


def run_tool(bed: bedlib.Bed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*bed.cli_prefix(), *bedlib.tun2socks_command(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def table_routes(bed: bedlib.Bed) -> str:
    return "".join(
        bed.run_cli(["ip", family, "route", "show", "table", str(TABLE)], timeout=10).stdout
        for family in ("-4", "-6")
    )


@pytest.fixture(scope="module")
def uplink(bed: bedlib.Bed) -> Iterator[None]:
    # The bed's namespaces have no way off the machine: the server side has no default route
    # (so what leaks to the "gateway" ends there), and nothing here names an outside address.
    for family in ("-4", "-6"):
        routes = bed.run_srv(["ip", family, "route", "show", "default"], timeout=10)
        assert routes.stdout.strip() == "", routes.stdout
    bed.set_uplink(True)
    try:
        yield
    finally:
        bed.set_uplink(False)


def route_config(artifact_dir: Path, strict: bool, way: str = "host_route") -> dict[str, Any]:
    route: dict[str, Any] = {
        "auto": True,
        "strict": strict,
        "state_dir": str(artifact_dir / "state"),
    }
    if way == "mark":
        route["mark"] = MARK
    return {"route": route, "log": {"level": "info"}}


@pytest.mark.parametrize("way", ["host_route", "mark"])
def test_strict_nothing_leaves_but_to_the_proxy_while_serving_after_kill_9_and_across_restart(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    uplink: None,
    way: str,
) -> None:
    bed.stop_tun2socks()
    config = route_config(artifact_dir, strict=True, way=way)
    t2s = start_tun2socks(routes=False, extra=config)
    assert peer(bed) == bedlib.TARGET_IP  # proxied: danted connects from the target's host

    # Serving: the workload works through the tunnel (TCP, IPv6 over the IPv4 proxy path).
    results, leaked = audit(bed)
    assert [results[step] for step in TUNNELLED] == ["ok", "ok"], results
    assert leaked == [], "\n".join(map(str, leaked))

    # Killed: the TUN is gone with its route; the guard holds the traffic.
    t2s.process.kill()
    t2s.process.wait(10)
    assert not bed.tun_exists()
    routes = table_routes(bed)
    assert routes.count("unreachable default") == 2, routes  # v4 and v6
    results, leaked = audit(bed)
    assert all(outcome.startswith("error") for outcome in results.values()), results
    assert leaked == [], "\n".join(map(str, leaked))

    # Across the next start: the new run takes the guard over, no gap to leak through.
    capture = leakcapture.UplinkCapture(bed)
    try:
        loop = subprocess.Popen(
            [*bed.cli_prefix(), *bedlib.helper_command("leakload"), bedlib.TARGET_IP,
             bedlib.TARGET_IP6, str(bedlib.HTTP_PORT), RESOLVER_PREFIX, "--loop", "30"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            t2s = start_tun2socks(routes=False, extra=config)
            assert peer(bed) == bedlib.TARGET_IP
        finally:
            loop.terminate()
            loop.wait(10)
        packets = capture.finish()
    finally:
        capture.stop()
    leaked = leakcapture.leaks(packets, PROXY, LOCAL)
    assert leaked == [], "\n".join(map(str, leaked))
    assert "route.strict: keeping its block in place" in t2s.log_text()

    # A clean stop lifts the block: the direct path is back.
    assert t2s.stop() == 0
    assert "unreachable" not in table_routes(bed)
    assert peer(bed) == LOCAL


def test_strict_block_stays_after_kill_9_until_tun2socks_down(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, artifact_dir: Path, uplink: None
) -> None:
    bed.stop_tun2socks()
    t2s = start_tun2socks(routes=False, extra=route_config(artifact_dir, strict=True))
    t2s.process.kill()
    t2s.process.wait(10)
    time.sleep(1.0)
    assert peer(bed).startswith("failed"), "a killed strict run must not open the direct path"
    down = run_tool(bed, "down", "--state-dir", str(artifact_dir / "state"))
    assert down.returncode == 0, down.stderr
    assert "unreachable" in down.stdout
    assert peer(bed) == LOCAL


def test_without_strict_kill_9_leaks_tcp_dns_ipv6_and_udp_directly(
    bed: bedlib.Bed, start_tun2socks: bedlib.StartTun2socks, artifact_dir: Path, uplink: None
) -> None:
    """The control: route.auto alone falls back to the main table when the TUN is gone."""
    bed.stop_tun2socks()
    t2s = start_tun2socks(routes=False, extra=route_config(artifact_dir, strict=False))
    results, leaked = audit(bed)
    assert [results[step] for step in TUNNELLED] == ["ok", "ok"], results
    assert leaked == [], "\n".join(map(str, leaked))  # while serving: nothing
    t2s.process.kill()
    t2s.process.wait(10)
    results, leaked = audit(bed)
    try:
        # The GETs now succeed directly: from the client's own address, past the proxy.
        assert [results[step] for step in TUNNELLED] == ["ok", "ok"], results
        leaked_to = {(p.dst, p.dst_port) for p in leaked}
        assert (bedlib.TARGET_IP, str(bedlib.HTTP_PORT)) in leaked_to
        assert (bedlib.TARGET_IP6, str(bedlib.HTTP_PORT)) in leaked_to
        assert (bedlib.TARGET_IP, "853") in leaked_to and (bedlib.TARGET_IP, "443") in leaked_to
        assert {f"{RESOLVER_PREFIX}{i}" for i in range(1, 21)} <= {p.dst for p in leaked}
        assert any(":icmp" in p.protocols and p.dst == bedlib.TARGET_IP for p in leaked)
        assert {"224.0.0.251", "224.0.0.252"} <= {p.dst for p in leaked}
    finally:
        down = run_tool(bed, "down", "--state-dir", str(artifact_dir / "state"))
        assert down.returncode == 0, down.stderr
