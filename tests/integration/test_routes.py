"""route.auto, loop prevention, teardown, rules, fd://N and --user, in the namespace bed.

Here the bed adds no route: tun2socks sets its own (`start_tun2socks(routes=False)`). The client
namespace gets a default route via the server's veth (`set_uplink`), like the gateway of a LAN,
so that "the original path" exists. The HTTP server's /peer tells where a connection came from:
the proxy's address when proxied, the client's veth address when direct.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import apiclient
from tests.integration import bed as bedlib

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()),
        reason="needs " + ", ".join(bedlib.missing_requirements()),
    ),
]

REPO = Path(__file__).resolve().parents[2]
TABLE = 7280
TARGET = f"{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"
TARGET6 = f"[{bedlib.TARGET_IP6}]:{bedlib.HTTP_PORT}"
DIRECT_IP, BLOCK_IP = "198.19.0.11", "198.19.0.12"  # extra addresses of the server (rules)
MARK = 0x2A
# danted runs next to the HTTP server and connects from an address of lo: for a destination of
# its own host the kernel takes the destination itself as source. A direct connection comes
# from the client's veth instead.
PROXIED_PEER, PROXIED_PEER6 = bedlib.TARGET_IP, bedlib.TARGET_IP6
VOLATILE = {"expires", "valid_life_time", "preferred_life_time", "cacheinfo", "stats64"}


# --- helpers -----------------------------------------------------------------------------------


def curl(bed: bedlib.Bed, url: str, max_time: float = 10.0) -> subprocess.CompletedProcess[str]:
    return bed.run_cli(
        ["curl", "-sS", "-g", "--max-time", str(max_time), url], timeout=max_time + 10
    )


def peer(bed: bedlib.Bed, host_port: str) -> str:
    """The address the HTTP server saw the request come from."""
    proc = curl(bed, f"http://{host_port}/peer")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _strip(item: Any) -> Any:
    if isinstance(item, dict):
        return {k: _strip(v) for k, v in item.items() if k not in VOLATILE}
    if isinstance(item, list):
        return [_strip(v) for v in item]
    return item


def snapshot(bed: bedlib.Bed) -> dict[str, list[str]]:
    """Routes of every table, policy rules and addresses of the client namespace, v4 and v6."""
    found: dict[str, list[str]] = {}
    for family in ("-4", "-6"):
        for what in (["route", "show", "table", "all"], ["rule", "show"], ["addr", "show"]):
            proc = bedlib.run(["ip", "-n", bed.cli_ns, "-j", family, *what], timeout=10)
            items = json.loads(proc.stdout or "[]")
            found[f"{family} {what[0]}"] = sorted(
                json.dumps(_strip(i), sort_keys=True) for i in items
            )
    return found


def route_config(artifact_dir: Path, **route: Any) -> dict[str, Any]:
    return {"route": {"auto": True, "state_dir": str(artifact_dir / "state"), **route}}


def tun2socks_env() -> dict[str, str]:
    """The environment for tun2socks runs started here: this checkout's package first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_cli_tool(
    bed: bedlib.Bed, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """A short tun2socks command (down, a second run) in the client namespace."""
    return subprocess.run(
        [*bed.cli_prefix(), *bedlib.tun2socks_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tun2socks_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def rules_of(bed: bedlib.Bed) -> str:
    return (
        bed.run_cli(["ip", "rule"], timeout=10).stdout
        + bed.run_cli(["ip", "-6", "rule"], timeout=10).stdout
    )


@pytest.fixture(scope="module")
def uplink(bed: bedlib.Bed) -> Iterator[None]:
    bed.set_uplink(True)
    for address in (DIRECT_IP, BLOCK_IP):
        bed.run_srv(["ip", "addr", "replace", f"{address}/32", "dev", "lo"], timeout=10, check=True)
    try:
        yield
    finally:
        bed.set_uplink(False)
        for address in (DIRECT_IP, BLOCK_IP):
            bed.run_srv(["ip", "addr", "del", f"{address}/32", "dev", "lo"], timeout=10)


@pytest.fixture
def before(bed: bedlib.Bed, uplink: None) -> dict[str, list[str]]:
    bed.stop_tun2socks()
    state = snapshot(bed)
    assert "t2s0" not in json.dumps(state)
    return state


# --- route.auto --------------------------------------------------------------------------------


def test_route_auto_proxies_bed_traffic_and_sigterm_restores_everything(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    before: dict[str, list[str]],
) -> None:
    # Without tun2socks, the uplink reaches the server directly from the client's address.
    assert peer(bed, TARGET) == bedlib.CLI_VETH_IP
    t2s = start_tun2socks(
        routes=False, extra={**route_config(artifact_dir), "log": {"level": "debug"}}
    )
    assert peer(bed, TARGET) == PROXIED_PEER
    assert peer(bed, TARGET6) == PROXIED_PEER6
    # The proxy connection keeps its path: the kernel routes it out of the veth, and the TUN
    # never saw a flow to the proxy.
    route = bed.run_cli(["ip", "route", "get", bedlib.SRV_VETH_IP], timeout=10).stdout
    assert f"dev {bedlib.CLI_VETH}" in route
    assert f"-> {bedlib.SRV_VETH_IP}:{bedlib.SOCKS_PORT}" not in t2s.log_text()
    assert f"-> {bedlib.TARGET_IP}:{bedlib.HTTP_PORT}" in t2s.log_text()
    assert snapshot(bed) != before
    assert t2s.stop() == 0
    assert snapshot(bed) == before
    assert list((artifact_dir / "state").iterdir()) == []


@pytest.mark.parametrize("way", ["host_route", "mark", "bind_interface"])
def test_a_proxy_behind_the_gateway_never_loops_into_the_tun(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    before: dict[str, list[str]],
    way: str,
) -> None:
    """The far proxy is reached only through the default route: without loop prevention its
    connection would enter the TUN. Each way on its own keeps it out."""
    far_proxy = bed.start_far_proxy()
    protection = {"mark": {"mark": MARK}, "bind_interface": {"bind_interface": bedlib.CLI_VETH}}
    extra = route_config(artifact_dir, **protection.get(way, {}))
    extra["proxy"] = {"url": far_proxy}
    extra["log"] = {"level": "debug"}
    t2s = start_tun2socks(routes=False, extra=extra)
    table = bed.run_cli(["ip", "route", "show", "table", str(TABLE)], timeout=10).stdout
    host_route = f"{bedlib.FAR_PROXY_IP} via {bedlib.SRV_VETH_IP} dev {bedlib.CLI_VETH}"
    assert (host_route in table) == (way == "host_route"), table
    assert (f"fwmark {MARK:#x} lookup main" in rules_of(bed)) == (way == "mark")
    # Proxied: the far proxy's own address is what the server sees.
    assert peer(bed, TARGET) == bedlib.FAR_PROXY_IP
    assert f"-> {bedlib.FAR_PROXY_IP}:{bedlib.FAR_PROXY_PORT}" not in t2s.log_text()
    assert t2s.stop() == 0
    assert snapshot(bed) == before


def test_sigkill_leaves_a_record_that_down_undoes(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    before: dict[str, list[str]],
) -> None:
    resolv_before = bed.run_cli(["cat", "/etc/resolv.conf"], timeout=10).stdout
    extra = route_config(artifact_dir, mark=MARK, exclude=["203.0.113.0/24"], system_dns=True)
    t2s = start_tun2socks(routes=False, extra=extra)
    assert peer(bed, TARGET) == PROXIED_PEER
    # The resolver points into the TUN while it runs.
    resolv = bed.run_cli(["cat", "/etc/resolv.conf"], timeout=10).stdout
    assert f"nameserver {bedlib.TUN_GW}" in resolv and f"nameserver {bedlib.TUN_GW6}" in resolv
    t2s.process.kill()
    t2s.process.wait(10)
    # The TUN went with the process, and with it its routes; rules, throw routes and the
    # resolver stay behind, recorded.
    assert f"lookup {TABLE}" in rules_of(bed)
    assert snapshot(bed) != before
    state_dir = str(artifact_dir / "state")
    down = run_cli_tool(bed, "down", "--state-dir", state_dir)
    assert down.returncode == 0, down.stderr
    assert re.search(rf"{bedlib.TUN_NAME}: undid \d+ changes left by pid {t2s.pid}", down.stdout)
    assert snapshot(bed) == before
    assert bed.run_cli(["cat", "/etc/resolv.conf"], timeout=10).stdout == resolv_before
    again = run_cli_tool(bed, "down", "--state-dir", state_dir)
    assert (again.returncode, again.stdout.strip()) == (
        0,
        f"nothing to undo: no records in {state_dir}",
    )


def test_sigterm_under_heavy_traffic_exits_within_5_s_and_restores_the_system(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    before: dict[str, list[str]],
) -> None:
    """Twelve endless transfers and a UDP echo stream run through the TUN when SIGTERM comes:
    tun2socks exits 0 within 5 s, and routes, rules, addresses and the resolver are as they
    were before it started. (Without route.auto: test_robustness.py.)"""

    def resolver() -> str:
        return bed.run_cli(["cat", "/etc/resolv.conf"], timeout=10).stdout

    resolv_before = resolver()
    bed.start_optional_servers(udp_echo=True)
    extra = route_config(artifact_dir, mark=MARK, exclude=["203.0.113.0/24"], system_dns=True)
    t2s = start_tun2socks(routes=False, extra=extra)
    assert f"nameserver {bedlib.TUN_GW}" in resolver()
    here = Path(__file__).resolve().parent
    transfers = [sys.executable, str(here / "faultclient.py"), "transfers", "--host",
                 bedlib.TARGET_IP, "--downloads", "6", "--uploads", "6"]  # fmt: skip
    udp = [sys.executable, str(here / "udptool.py"), "echo", bedlib.TARGET_IP,
           str(bedlib.UDP_ECHO_PORTS[0]), "--count", "1000000", "--timeout", "1"]  # fmt: skip
    clients = [
        subprocess.Popen(
            [*bed.cli_prefix(), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for args in (transfers, udp)
    ]
    try:
        assert clients[0].stdout is not None
        ready, _, _ = select.select([clients[0].stdout], [], [], 60)
        assert ready and "flowing" in clients[0].stdout.readline(), t2s.log_tail()

        def udp_echoed() -> bool:
            udp = apiclient.get_json(bed, "/stats")["components"]["udp"]
            return bool(udp.get("sessions") and udp.get("datagrams_down", 0) > 20)

        apiclient.wait_for("UDP echoes through the TUN", udp_echoed)
        assert clients[1].poll() is None  # still echoing
        started = time.monotonic()
        returncode = t2s.stop(timeout=5.0)
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            client.kill()
            client.communicate(timeout=10)
    assert returncode == 0 and elapsed < 5.0, f"exit {returncode} after {elapsed:.1f} s"
    assert snapshot(bed) == before
    assert resolver() == resolv_before
    assert list((artifact_dir / "state").iterdir()) == []


def test_starting_twice_on_one_device_fails_with_a_clear_message(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    before: dict[str, list[str]],
) -> None:
    t2s = start_tun2socks(routes=False, extra=route_config(artifact_dir))
    second = run_cli_tool(bed, "run", "-c", str(t2s.config_path))
    assert second.returncode == 1
    assert (
        f"tun2socks is already running on device {bedlib.TUN_NAME} (pid {t2s.pid})" in second.stderr
    )
    # ... and `down` refuses to undo what the running one owns.
    down = run_cli_tool(bed, "down", "--state-dir", str(artifact_dir / "state"))
    assert down.returncode == 1 and "already running" in down.stderr
    assert t2s.process.poll() is None
    assert peer(bed, TARGET) == PROXIED_PEER
    assert t2s.stop() == 0
    assert snapshot(bed) == before


# --- rules -------------------------------------------------------------------------------------


def test_rules_direct_block_and_the_default_proxy(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    before: dict[str, list[str]],
) -> None:
    extra = route_config(artifact_dir, mark=MARK)
    extra["rules"] = [
        {"dst": [f"{DIRECT_IP}/32", f"{bedlib.TARGET_IP6}/128"], "action": "direct"},
        {"dst": f"{BLOCK_IP}/32", "port": bedlib.HTTP_PORT, "action": "block"},
    ]
    t2s = start_tun2socks(routes=False, extra=extra)
    assert peer(bed, TARGET) == PROXIED_PEER  # no rule matches: the default, proxy
    assert peer(bed, f"{DIRECT_IP}:{bedlib.HTTP_PORT}") == bedlib.CLI_VETH_IP
    assert peer(bed, TARGET6) == bedlib.CLI_VETH_IP6
    started = time.monotonic()
    blocked = curl(bed, f"http://{BLOCK_IP}:{bedlib.HTTP_PORT}/peer")
    assert blocked.returncode == 7, blocked  # connection refused: the SYN got an RST
    assert time.monotonic() - started < 5
    assert f"-> {BLOCK_IP}:{bedlib.HTTP_PORT}: blocked by rule 1" in t2s.log_text()
    assert t2s.stop() == 0
    assert snapshot(bed) == before


# --- fd://N and --user -------------------------------------------------------------------------


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} for {pid}")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _descendant_running(root: int, pattern: str, timeout: float = 15.0) -> int:
    """The pid of a process below `root` whose command line matches `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        todo = [root]
        while todo:
            pid = todo.pop()
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                todo += _children(pid)
            except OSError:
                continue
            if re.search(pattern, cmdline) and pid != root:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no process matching {pattern!r} below {root}")


def _launch(bed: bedlib.Bed, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [*bed.cli_prefix(), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=tun2socks_env(),
        )


def _stop(process: subprocess.Popen[bytes]) -> int | None:
    return bedlib.stop_process(process, bedlib.STOP_TIMEOUT_S)


def test_device_from_a_descriptor_handed_over_by_a_parent(
    bed: bedlib.Bed, artifact_dir: Path, before: dict[str, list[str]]
) -> None:
    """examples/fd-parent.py opens and configures the TUN; tun2socks runs with no capability
    at all on `--device fd://N`, and relays through the proxy."""
    config = bed.tun2socks_config()
    del config["tun"]["name"]
    config_path = artifact_dir / "fd.yaml"
    config_path.write_text(yaml.safe_dump(config))
    no_caps = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]
    parent = [
        sys.executable,
        str(REPO / "examples" / "fd-parent.py"),
        *("--name", bedlib.TUN_NAME, "--mtu", str(bed.mtu)),
        *("--address", f"{bedlib.TUN_IP}/24", "--address", f"{bedlib.TUN_IP6}/64", "--"),
        *no_caps,
        *bedlib.tun2socks_command(),
        *("run", "-c", str(config_path), "--device", "fd://{fd}", "--log-level", "info"),
    ]
    log_path = artifact_dir / "fd.log"
    process = _launch(bed, parent, log_path)
    try:
        # (not "fd://{fd}": that is the parent itself, or a child of it not yet exec'd)
        child = _descendant_running(process.pid, r"fd://\d")
        bed.wait_for_log(bedlib.Tun2socks(process, config_path, log_path), "tun2socks running", 15)
        assert _status_field(child, "CapEff") == "0000000000000000"
        # Routes are the parent's job; here the test's.
        bed.run_cli(
            [
                "ip",
                "route",
                "replace",
                f"{bedlib.TARGET_IP}/32",
                "via",
                bedlib.TUN_GW,
                "dev",
                bedlib.TUN_NAME,
                "onlink",
            ],
            timeout=10,
            check=True,
        )
        assert peer(bed, TARGET) == PROXIED_PEER
    finally:
        code = _stop(process)
    assert code == 0, log_path.read_text()
    assert snapshot(bed) == before


@pytest.mark.parametrize("mark", [0, MARK])
def test_run_as_user_serves_unprivileged_and_the_parent_restores(
    bed: bedlib.Bed, artifact_dir: Path, before: dict[str, list[str]], mark: int
) -> None:
    """The data path runs as nobody; it keeps CAP_NET_ADMIN only when SO_MARK needs it."""
    extra = {**route_config(artifact_dir, mark=mark), "log": {"level": "info"}}
    config = bed.tun2socks_config(extra=extra)
    config_path = artifact_dir / "user.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = artifact_dir / "user.log"
    process = _launch(
        bed,
        [*bedlib.tun2socks_command(), "run", "-c", str(config_path), "--user", "nobody"],
        log_path,
    )
    try:
        t2s = bedlib.Tun2socks(process, config_path, log_path)
        bed.wait_for_log(t2s, "tun2socks running", 15)
        child = _descendant_running(process.pid, "--user")
        assert _status_field(child, "Uid").split()[:2] == ["65534", "65534"]
        assert _status_field(child, "CapEff") == f"{(1 << 12) if mark else 0:016x}"
        assert peer(bed, TARGET) == PROXIED_PEER
    finally:
        code = _stop(process)
    assert code == 0, log_path.read_text()
    assert snapshot(bed) == before


def test_cap_net_admin_alone_is_enough_for_route_auto(
    bed: bedlib.Bed, artifact_dir: Path, before: dict[str, list[str]]
) -> None:
    """No root powers but CAP_NET_ADMIN: device, routes, rules and SO_MARK all work."""
    extra = {**route_config(artifact_dir, mark=MARK), "log": {"level": "info"}}
    config_path = artifact_dir / "cap.yaml"
    config_path.write_text(yaml.safe_dump(bed.tun2socks_config(extra=extra)))
    only_net_admin = ["setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all"]
    log_path = artifact_dir / "cap.log"
    command = [*only_net_admin, *bedlib.tun2socks_command(), "run", "-c", str(config_path)]
    process = _launch(bed, command, log_path)
    try:
        bed.wait_for_log(bedlib.Tun2socks(process, config_path, log_path), "tun2socks running", 15)
        assert _status_field(process.pid, "CapEff") == f"{1 << 12:016x}"  # CAP_NET_ADMIN
        assert f"fwmark {MARK:#x} lookup main" in rules_of(bed)
        assert peer(bed, TARGET) == PROXIED_PEER
    finally:
        code = _stop(process)
    assert code == 0, log_path.read_text()
    assert snapshot(bed) == before
