"""`tun2socks exec -- COMMAND` as `nobody` with no capability, in the bed's client namespace.

The exec process runs as nobody (unprivileged.py) inside the client namespace, where the bed's
danted is reachable; COMMAND gets namespaces of its own whose only way out is the TUN. The
targets are reachable only through the proxy, so whatever COMMAND reaches went through it; the
HTTP server's /peer shows the proxy's address. DNS is answered by the bed's dnsmasq, through
the forwarder and the proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.integration import bed as bedlib
from tests.integration import conftest, dnsbed, unprivileged

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements(dns=True)) or bedlib.which("setpriv") is None,
        reason="needs setpriv and " + ", ".join(bedlib.missing_requirements(dns=True)),
    ),
]

TARGET = f"{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"
ECHO_PORT = bedlib.UDP_ECHO_PORTS[0]
EXIT_SETUP_FAILED = 125


@pytest.fixture(scope="module")
def exec_bed() -> Iterator[bedlib.Bed]:
    with bedlib.Bed(conftest.RUN_DIR / "bed-exec", dns=True) as the_bed:
        the_bed.start_optional_servers(udp_echo=True)
        yield the_bed


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory nobody may write (TMPDIR of exec: where its resolv.conf is made)."""
    path = Path(tempfile.mkdtemp(prefix="t2s-exec-test-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False, timeout=30)


def exec_argv(bed: bedlib.Bed, workdir: Path, command: Sequence[str], *extra: str) -> list[str]:
    """ip netns exec CLIENT <as nobody> tun2socks exec --proxy ... -- COMMAND."""
    tun2socks = [*bedlib.tun2socks_command(), "exec", "--proxy", bed.proxy_url()]
    tun2socks += ["--set", f"dns.upstreams=[tcp://{bedlib.TARGET_IP}]", *extra, "--"]
    env = ["env", f"TMPDIR={workdir / 'tmp'}", "PYTHONDONTWRITEBYTECODE=1"]
    inner = unprivileged.as_nobody(workdir, [*env, *tun2socks, *command])
    return [*bed.cli_prefix(), *inner]


def make_tmpdir(workdir: Path) -> None:
    """exec's TMPDIR, which nobody may write into (sticky, as /tmp)."""
    (workdir / "tmp").mkdir(mode=0o777, exist_ok=True)
    (workdir / "tmp").chmod(0o1777)


def run_exec(
    bed: bedlib.Bed, workdir: Path, command: Sequence[str], *extra: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    make_tmpdir(workdir)
    return subprocess.run(
        exec_argv(bed, workdir, command, *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@contextlib.contextmanager
def exec_until(
    bed: bedlib.Bed, workdir: Path, command: Sequence[str], *extra: str, marker: Path, what: str
) -> Iterator[subprocess.Popen[str]]:
    """`tun2socks exec` of `command` in the background, yielded once COMMAND made `marker`
    (else fails, saying COMMAND did not `what`); killed on the way out if it still runs."""
    make_tmpdir(workdir)
    process = subprocess.Popen(
        exec_argv(bed, workdir, command, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"COMMAND did not {what}"
            time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


def status_fields(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+):\s+(.*)$", text, flags=re.MULTILINE))


def test_curl_goes_through_the_proxy_with_no_root_and_no_capability(
    exec_bed: bedlib.Bed, workdir: Path
) -> None:
    script = (
        "cat /proc/$PPID/status; echo ====; cat /proc/self/status; echo ====; "
        f"curl -sS --max-time 10 http://{TARGET}/peer; echo ====; "
        f"curl -sS -g --max-time 10 http://[{bedlib.TARGET_IP6}]:{bedlib.HTTP_PORT}/peer"
    )
    proc = run_exec(exec_bed, workdir, ["sh", "-c", script])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parent, child, peer4, peer6 = proc.stdout.split("====\n")
    # tun2socks itself (COMMAND's parent) and COMMAND: nobody, with empty capability sets.
    for status in (status_fields(parent), status_fields(child)):
        assert status["Uid"].split() == ["65534"] * 4, status
        assert status["Gid"].split() == ["65534"] * 4, status
        for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(status[caps], 16) == 0, (caps, status[caps])
    assert status_fields(parent)["Name"].startswith("python")
    # The server saw the proxy: the client namespace has no other way to the target.
    assert peer4.strip() == bedlib.TARGET_IP, proc.stderr
    assert peer6.strip() == bedlib.TARGET_IP6, proc.stderr


def test_the_namespace_has_lo_and_a_tun_with_addresses_mtu_and_default_routes(
    exec_bed: bedlib.Bed, workdir: Path
) -> None:
    script = "ip -o link; echo ====; ip -o addr; echo ====; ip route; ip -6 route"
    proc = run_exec(exec_bed, workdir, ["sh", "-c", script], "--set", "tun.mtu=1400")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    links, addresses, routes = proc.stdout.split("====\n")
    names = [line.split(":")[1].strip() for line in links.splitlines()]
    assert names == ["lo", "tun0"], links
    assert "mtu 1400" in links.splitlines()[1] and ",UP," in links.splitlines()[1]
    assert "lo    inet 127.0.0.1/8" in addresses
    assert "tun0    inet 198.18.0.1/15" in addresses
    assert "tun0    inet6 fd7f:7f7f:7f7f::1/64" in addresses
    assert routes.count("default dev tun0") == 2, routes  # IPv4 and IPv6


def test_dig_and_udp_echo_inside(exec_bed: bedlib.Bed, workdir: Path) -> None:
    udp = [sys.executable, str(bedlib.UDP_TOOL_SCRIPT), "echo", bedlib.TARGET_IP, str(ECHO_PORT)]
    script = (
        "cat /etc/resolv.conf; echo ====; "
        f"dig +time=5 +tries=2 {dnsbed.ZONE_NAME} A; echo ====; "
        f"{' '.join(udp)} --count 20 --max-size 1400"
    )
    proc = run_exec(exec_bed, workdir, ["sh", "-c", script])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resolv, dig, echo = proc.stdout.split("====\n")
    # The private resolv.conf points at the forwarder's address in the TUN prefix.
    assert resolv.splitlines()[0] == "nameserver 198.18.0.2", resolv
    assert "status: NOERROR" in dig and bedlib.TARGET_IP in dig, dig
    assert "SERVER: 198.18.0.2#53" in dig, dig
    result = json.loads(echo.strip().splitlines()[-1])
    assert result["matched"] == 20 and result["mismatched"] == 0, result
    # The host namespace's resolv.conf is unchanged.
    assert "198.18.0.2" not in exec_bed.run_cli(["cat", "/etc/resolv.conf"], timeout=10).stdout


def test_busybox_wget_is_tunnelled(exec_bed: bedlib.Bed, workdir: Path) -> None:
    busybox = bedlib.which("busybox")
    assert busybox is not None, "busybox is installed on this machine"
    proc = run_exec(exec_bed, workdir, [busybox, "wget", "-q", "-O", "-", f"http://{TARGET}/peer"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == bedlib.TARGET_IP


def _static_go_client() -> str | None:
    kubectl = bedlib.which("kubectl")
    if kubectl is None:
        return None
    kind = subprocess.run(["file", "-L", kubectl], capture_output=True, text=True, timeout=10)
    return kubectl if "statically linked" in kind.stdout else None


@pytest.mark.skipif(_static_go_client() is None, reason="needs a static Go binary (kubectl)")
def test_a_static_go_client_that_ignores_ld_preload_is_tunnelled(
    exec_bed: bedlib.Bed, workdir: Path
) -> None:
    """kubectl is a static Go binary: no libc, so LD_PRELOAD tools (proxychains) miss it."""
    kubectl = _static_go_client()
    assert kubectl is not None
    command = ["env", f"HOME={workdir / 'tmp'}", kubectl, f"--server=http://{TARGET}"]
    proc = run_exec(exec_bed, workdir, [*command, "get", "--raw", "/peer"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == bedlib.TARGET_IP


def test_exit_status_is_the_commands(exec_bed: bedlib.Bed, workdir: Path) -> None:
    assert run_exec(exec_bed, workdir, ["sh", "-c", "exit 7"]).returncode == 7
    assert run_exec(exec_bed, workdir, ["sh", "-c", "kill -TERM $$"]).returncode == 128 + 15
    missing = run_exec(exec_bed, workdir, ["/nonexistent/command"])
    assert missing.returncode == 127
    assert missing.stderr.strip().splitlines()[-1] == (
        "tun2socks: error: cannot run /nonexistent/command: No such file or directory"
    )


def test_signals_are_forwarded_and_nothing_is_left_behind(
    exec_bed: bedlib.Bed, workdir: Path
) -> None:
    marker = workdir / "ready"
    script = (
        f"trap 'echo got TERM; exit 42' TERM; readlink /proc/self/ns/net /proc/self/ns/user; "
        f"touch {marker}; sleep 30 & wait"
    )
    command = ["sh", "-c", script]
    with exec_until(exec_bed, workdir, command, marker=marker, what="start") as process:
        exec_pid = _exec_process(process.pid)
        os.kill(exec_pid, signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 42, out + err
    assert "got TERM" in out
    namespaces = [line for line in out.splitlines() if line.startswith(("net:", "user:"))]
    assert len(namespaces) == 2, out
    # No process is left in COMMAND's namespaces (the background sleep was killed; its zombie
    # is reaped by init soon after), and exec left no file in its TMPDIR.
    deadline = time.monotonic() + 5
    while (left := _processes_in(namespaces)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []
    assert list((workdir / "tmp").iterdir()) == []
    assert not any(p.name.startswith("tun2socks-exec-") for p in Path("/tmp").iterdir())


def test_the_api_answers_when_asked_for(exec_bed: bedlib.Bed, workdir: Path) -> None:
    """The API listens in exec's own namespace (where COMMAND cannot reach it)."""
    marker = workdir / "fetched"
    script = (
        f"curl -sS --max-time 10 -o /dev/null http://{TARGET}/small && touch {marker}; sleep 30"
    )
    api = ["--set", "api.enabled=true", "--set", "api.listen=127.0.0.1:9199"]
    command = ["sh", "-c", script]
    with exec_until(exec_bed, workdir, command, *api, marker=marker, what="fetch") as process:
        get = ["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9199/stats"]
        stats = json.loads(exec_bed.run_cli(get, timeout=20).stdout)
        assert stats["flows"]["total"] >= 1, stats
        assert stats["relayed"]["bytes_down"] > 0, stats
        os.kill(_exec_process(process.pid), signal.SIGTERM)
        process.communicate(timeout=20)
    assert process.returncode == 128 + signal.SIGTERM


def _processes_in(namespaces: list[str]) -> list[str]:
    found = []
    for ns_link in Path("/proc").glob("[0-9]*/ns/*"):
        try:
            if os.readlink(ns_link) in namespaces:
                status = (ns_link.parent.parent / "status").read_text().splitlines()[:3]
                found.append(f"{ns_link}: {status}")
        except OSError:
            continue
    return found


def _exec_process(root_pid: int) -> int:
    """The tun2socks exec process: `root_pid` itself once ip netns exec, unshare, sh, setpriv
    and env have each executed the next."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in [root_pid, *_descendants(root_pid)]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline[0].endswith((b"python3", b"python")) and b"tun2socks" in cmdline:
                return pid
        time.sleep(0.05)
    raise AssertionError("no tun2socks exec process found")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                todo.append(child)
    return found


def test_tun_device_closed_to_the_user_is_one_clear_line(
    exec_bed: bedlib.Bed, workdir: Path
) -> None:
    make_tmpdir(workdir)
    command = [*bedlib.tun2socks_command(), "exec", "--proxy", exec_bed.proxy_url(), "--", "true"]
    argv = unprivileged.as_nobody(workdir, command, tun_mode="0600")
    proc = subprocess.run(
        [*exec_bed.cli_prefix(), *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == EXIT_SETUP_FAILED
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "/dev/net/tun is not open to this user (mode 0600)" in lines[0]
    assert "chmod 0666 /dev/net/tun" in lines[0]


def test_forbidden_user_namespaces_are_one_line_naming_the_sysctl(
    exec_bed: bedlib.Bed, workdir: Path
) -> None:
    """user.max_user_namespaces = 0 inside a user namespace of the test's own (the machine's
    setting is untouched): creating another one fails there as on a locked-down system."""
    command = [*bedlib.tun2socks_command(), "exec", "--proxy", exec_bed.proxy_url(), "--", "true"]
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    argv = ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh", *command]
    proc = subprocess.run(
        [*exec_bed.cli_prefix(), *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == EXIT_SETUP_FAILED, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "cannot create a user namespace" in lines[0]
    assert "user.max_user_namespaces" in lines[0]
