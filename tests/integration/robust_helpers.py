"""Helpers of the robustness and load tests: extra servers in the bed's server namespace, a
killable danted, process measurements (RSS, open fds), and a second handle on a process's TUN.

Every server started here runs in its own session (process group) so that it can be killed
whole, and is stopped by the context manager that started it, even when the test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.integration import bed as bedlib

HERE = Path(__file__).resolve().parent
ASYNC_SERVERS = HERE / "asyncservers.py"
LOADGEN = bedlib.helper_command("loadgen")  # a command: loadgen imports soakudp
ASYNC_SOCKS_PORT = 1090
ECHO_PORT = 7100
KILLABLE_SOCKS_PORT = 1084
SYS_PIDFD_GETFD = 438  # x86_64
TUNSETSNDBUF = 0x400454D4
TUNGETSNDBUF = 0x800454D3


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    return bedlib.process_rss_bytes(pid)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


@contextlib.contextmanager
def raised_nofile_limit() -> Iterator[None]:
    """Children started meanwhile (tun2socks, clients) inherit the hard limit as soft limit."""
    import resource

    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (old[1], old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def start_in_srv(
    bed: bedlib.Bed, name: str, args: list[str], ready: str | None = None, timeout: float = 15
) -> subprocess.Popen[bytes]:
    """Start `args` in the server namespace in a new session; wait for `ready` on its stdout."""
    log = bed.workdir / f"{name}.log"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", bed.srv_ns, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if ready else open(log, "wb"),  # noqa: SIM115 - the child's
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    if ready is None:
        return proc
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.2)
        if readable:
            line = proc.stdout.readline().decode(errors="replace")
            if ready in line:
                return proc
            if not line:
                break
    kill_group(proc)
    raise bedlib.BedError(f"{name} not ready within {timeout} s (exit {proc.poll()})")


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def async_servers(bed: bedlib.Bed, processes: int = 2) -> Iterator[str]:
    """SOCKS5 (no auth) on the proxy address and an echo server on the target, `processes` of
    each sharing their port (SO_REUSEPORT: one process may hold only RLIMIT_NOFILE fds).
    Yields the proxy URL for tun2socks."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(processes):
            for role, host, port in (
                ("socks", bedlib.SRV_VETH_IP, ASYNC_SOCKS_PORT),
                ("echo", bedlib.TARGET_IP, ECHO_PORT),
            ):
                args = [sys.executable, str(ASYNC_SERVERS), role, "--host", host]
                args += ["--port", str(port), "--reuse-port"]
                started.append(start_in_srv(bed, f"{role}-{i}", args, ready="listening"))
        yield f"socks5://{bedlib.SRV_VETH_IP}:{ASYNC_SOCKS_PORT}"
    finally:
        for proc in started:
            kill_group(proc, signal.SIGTERM)


@contextlib.contextmanager
def echo_servers(bed: bedlib.Bed, processes: int = 2) -> Iterator[None]:
    """The echo server of `async_servers` alone, for tests whose proxy is the bed's danted."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(processes):
            args = [sys.executable, str(ASYNC_SERVERS), "echo", "--host", bedlib.TARGET_IP]
            args += ["--port", str(ECHO_PORT), "--reuse-port"]
            started.append(start_in_srv(bed, f"echo-{i}", args, ready="listening"))
        yield
    finally:
        for proc in started:
            kill_group(proc, signal.SIGTERM)


class KillableDanted:
    """A danted of our own (no auth) on KILLABLE_SOCKS_PORT, to be killed and restarted;
    `settings` are extra lines for its configuration."""

    def __init__(self, bed: bedlib.Bed, settings: str = "") -> None:
        self.bed = bed
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = bed.workdir / "danted-killable.conf"
        self.config.write_text(
            settings + f"logoutput: {bed.workdir / 'danted-killable.out'}\n"
            f"internal: {bedlib.SRV_VETH_IP} port = {KILLABLE_SOCKS_PORT}\n"
            "external: lo\nclientmethod: none\nsocksmethod: none\n"
            "user.privileged: root\nuser.unprivileged: nobody\n"
            "client pass { from: 198.18.0.0/15 to: 0/0 }\n"
            "socks pass { from: 0/0 to: 198.19.0.0/16 command: connect }\n"
            "socks pass { from: 0/0 to: fd00:c8::/32 command: connect }\n"
        )

    @property
    def url(self) -> str:
        return f"socks5://{bedlib.SRV_VETH_IP}:{KILLABLE_SOCKS_PORT}"

    def start(self) -> None:
        danted = bedlib.which("danted") or "danted"
        pid_file = self.bed.workdir / "danted-killable.pid"
        self.proc = start_in_srv(
            self.bed, "danted-killable", [danted, "-f", str(self.config), "-p", str(pid_file)]
        )
        self.bed.wait_listening({KILLABLE_SOCKS_PORT}, watch=[("danted-killable", self.proc)])

    def kill(self) -> None:
        """SIGKILL danted and all its children at once, as a crash would."""
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None

    def __enter__(self) -> KillableDanted:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def tun_fd_number(pid: int) -> int:
    """The fd number of /dev/net/tun in process `pid`."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") == "/dev/net/tun":
                return int(name)
    raise bedlib.BedError(f"process {pid} has no TUN fd")


def grab_fd(pid: int, target_fd: int) -> int:
    """A duplicate of another process's fd (pidfd_getfd, Linux 5.6; needs ptrace rights)."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0))
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        return fd
    finally:
        os.close(pidfd)


def ss_listeners(bed: bedlib.Bed, pid: int) -> list[str]:
    """Local addresses of the TCP/UDP sockets process `pid` listens on (or has bound, UDP)."""
    out = bed.run_cli(["ss", "-Hltnup"], timeout=10).stdout
    return parse_ss_listeners(out, pid)


def parse_ss_listeners(text: str, pid: int) -> list[str]:
    found = []
    for line in text.splitlines():
        if f"pid={pid}," not in line:
            continue
        fields = line.split()
        # Netid State Recv-Q Send-Q Local:Port Peer:Port Process
        found.append(fields[4])
    return found


def is_loopback(local: str) -> bool:
    host = re.sub(r"%\S+$", "", local.rsplit(":", 1)[0]).strip("[]")
    return host in ("127.0.0.1", "::1") or host.startswith("127.")
