"""Network changes without a restart (issue 15, build 2, the TCP part): the client namespace
gets a second uplink (its own veth pair and gateway to the server namespace); the proxy is
the far proxy, reached only through the default route. The default route moves from one
uplink to the other while the first goes down, then back: new TCP flows through tun2socks
work again within 2 s each time, with no restart, for the host-route way (the netlink
watcher moves the proxy's host route) and for route.mark (marked sockets follow the main
table by themselves). `tun2socks down` after a SIGKILL still restores the original state.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import bed as bedlib
from tests.integration.test_routes import run_cli_tool, snapshot

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
]

CLI2, SRV2 = "veth-cli2", "veth-srv2"
CLI2_IP, SRV2_IP = "198.18.2.1", "198.18.2.2"
TABLE = 7280
MARK = 0x2A
RECOVERY_S = 2.0
TARGET_URL = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}/peer"


@pytest.fixture(scope="module")
def two_uplinks(bed: bedlib.Bed) -> Iterator[None]:
    bedlib.run(
        [*("ip", "link", "add", CLI2, "netns", bed.cli_ns, "type", "veth"),
         *("peer", "name", SRV2, "netns", bed.srv_ns)],
        timeout=10,
    )  # fmt: skip
    try:
        bedlib.run(
            ["ip", "-n", bed.cli_ns, "addr", "add", f"{CLI2_IP}/24", "dev", CLI2], timeout=10
        )
        bedlib.run(
            ["ip", "-n", bed.srv_ns, "addr", "add", f"{SRV2_IP}/24", "dev", SRV2], timeout=10
        )
        ip_cli(bed, "link", "set", CLI2, "up")
        bedlib.run(["ip", "-n", bed.srv_ns, "link", "set", SRV2, "up"], timeout=10)
        bed.set_uplink(True)
        yield
    finally:
        bed.set_uplink(False)
        bedlib.run(["ip", "-n", bed.cli_ns, "link", "del", CLI2], timeout=10, check=False)


def peer(bed: bedlib.Bed, max_time: float = 5.0) -> str:
    proc = bed.run_cli(["curl", "-sS", "--max-time", str(max_time), TARGET_URL], timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else "failed"


def time_to_first_success(bed: bedlib.Bed, since: float) -> float:
    """Seconds from `since` to the start of the first proxied GET that works (bounded)."""
    deadline = since + 10.0
    while time.monotonic() < deadline:
        began = time.monotonic()
        if peer(bed, max_time=1.0) == bedlib.FAR_PROXY_IP:
            return began - since
        time.sleep(0.05)
    return float("inf")


def ip_cli(bed: bedlib.Bed, *args: str) -> None:
    bedlib.run(["ip", "-n", bed.cli_ns, *args], timeout=10)


def restore_uplink_1(bed: bedlib.Bed) -> None:
    """Link up, and what going down took with it: the IPv6 address (keep_addr_on_down is
    off), the bed's route to the proxy, the default routes."""
    ip_cli(bed, "link", "set", bedlib.CLI_VETH, "up")
    ip_cli(
        bed, "-6", "addr", "replace", f"{bedlib.CLI_VETH_IP6}/64", "dev", bedlib.CLI_VETH, "nodad"
    )
    ip_cli(bed, "route", "replace", f"{bedlib.SRV_VETH_IP}/32", "dev", bedlib.CLI_VETH)
    bed.set_uplink(True)


@pytest.mark.parametrize("way", ["host_route", "mark"])
def test_new_flows_follow_the_default_route_to_another_uplink_and_back(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    two_uplinks: None,
    way: str,
) -> None:
    bed.stop_tun2socks()
    far_proxy = bed.start_far_proxy()
    before = snapshot(bed)
    route = {"auto": True, "state_dir": str(artifact_dir / "state")}
    if way == "mark":
        route["mark"] = MARK
    extra = {"route": route, "proxy": {"url": far_proxy}, "log": {"level": "info"}}
    t2s = start_tun2socks(routes=False, extra=extra)
    assert peer(bed) == bedlib.FAR_PROXY_IP
    try:
        # Uplink 1 goes down (its routes with it); the default route moves to uplink 2.
        flipped = time.monotonic()
        ip_cli(bed, "link", "set", bedlib.CLI_VETH, "down")
        ip_cli(bed, "route", "replace", "default", "via", SRV2_IP, "dev", CLI2)
        took = time_to_first_success(bed, flipped)
        assert took < RECOVERY_S, (took, t2s.log_tail())
        table = bed.run_cli(["ip", "route", "show", "table", str(TABLE)], timeout=10).stdout
        if way == "host_route":
            assert f"{bedlib.FAR_PROXY_IP} via {SRV2_IP} dev {CLI2}" in table, table
        # And back: uplink 1 up again and preferred.
        flipped = time.monotonic()
        restore_uplink_1(bed)
        took = time_to_first_success(bed, flipped)
        assert took < RECOVERY_S, (took, t2s.log_tail())
        assert t2s.process.poll() is None  # no restart
    finally:
        restore_uplink_1(bed)
    # A SIGKILL leaves the record of what is there now; `down` undoes exactly that.
    t2s.process.kill()
    t2s.process.wait(10)
    down = run_cli_tool(bed, "down", "--state-dir", str(artifact_dir / "state"))
    assert down.returncode == 0, down.stderr
    assert snapshot(bed) == before


def test_strict_restart_after_the_uplink_changed_while_tun2socks_was_dead(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    two_uplinks: None,
) -> None:
    """route.strict keeps the block over the SIGKILL; meanwhile uplink 1 goes down (with the
    proxy's host route) and the default moves to uplink 2. The next start takes the block
    over, finds the proxy's new path in the main table (the kernel would answer through the
    block: unreachable), and serves through uplink 2."""
    bed.stop_tun2socks()
    far_proxy = bed.start_far_proxy()
    before = snapshot(bed)
    route = {"auto": True, "strict": True, "state_dir": str(artifact_dir / "state")}
    extra = {"route": route, "proxy": {"url": far_proxy}, "log": {"level": "info"}}
    t2s = start_tun2socks(routes=False, extra=extra)
    assert peer(bed) == bedlib.FAR_PROXY_IP
    t2s.process.kill()
    t2s.process.wait(10)
    try:
        ip_cli(bed, "link", "set", bedlib.CLI_VETH, "down")
        ip_cli(bed, "route", "replace", "default", "via", SRV2_IP, "dev", CLI2)
        assert peer(bed, max_time=2.0) == "failed"  # blocked, not direct
        t2s = start_tun2socks(routes=False, extra=extra)
        assert peer(bed) == bedlib.FAR_PROXY_IP
        table = bed.run_cli(["ip", "route", "show", "table", str(TABLE)], timeout=10).stdout
        assert f"{bedlib.FAR_PROXY_IP} via {SRV2_IP} dev {CLI2}" in table, table
        assert t2s.stop() == 0
    finally:
        restore_uplink_1(bed)
    assert snapshot(bed) == before


def test_a_flow_whose_uplink_went_down_ends_with_a_reset_not_a_hang(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    two_uplinks: None,
) -> None:
    """A download through the far proxy over uplink 1; uplink 1 goes down. Its upstream
    connection can never deliver again (TCP would retransmit for minutes): tun2socks resets
    the client's flow at once, and a new flow works over uplink 2."""
    bed.stop_tun2socks()
    far_proxy = bed.start_far_proxy()
    route = {"auto": True, "state_dir": str(artifact_dir / "state")}
    extra = {"route": route, "proxy": {"url": far_proxy}, "log": {"level": "info"}}
    t2s = start_tun2socks(routes=False, extra=extra)
    endless = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}/bytes/1099511627776"
    args = [*bed.cli_prefix(), "curl", "-sS", "--max-time", "60", "--limit-rate", "1M"]
    download = subprocess.Popen(
        [*args, "-o", "/dev/null", endless],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)
        assert download.poll() is None, download.communicate()
        went_down = time.monotonic()
        ip_cli(bed, "link", "set", bedlib.CLI_VETH, "down")
        ip_cli(bed, "route", "replace", "default", "via", SRV2_IP, "dev", CLI2)
        _, err = download.communicate(timeout=20)
        took = time.monotonic() - went_down
        assert download.returncode == 56, (download.returncode, err)  # reset by peer
        # tun2socks resets at once (the log line); under load curl was once seen to end only
        # ~10 s later (cause not found yet), still far from a hang: TCP alone would
        # retransmit for minutes, and curl waits 60 s.
        assert took < 15.0, took
        # Reset by the path watcher, or earlier by the upstream's own RST when the far side
        # already saw the move: either way the client's flow ended with a reset.
        log = t2s.log_text()
        assert (
            "reset 1 flows whose upstream path is gone" in log
            or "upstream connection lost: [Errno 104]" in log
        ), log
        assert peer(bed) == bedlib.FAR_PROXY_IP  # a new flow takes uplink 2
    finally:
        if download.poll() is None:
            download.kill()
            download.wait(5)
        restore_uplink_1(bed)
