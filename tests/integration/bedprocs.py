"""Commands, processes and clean-up for the test bed (bed.py): what runs on the host, what is
installed, and removing what a bed (or a killed earlier run) left behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

STOP_TIMEOUT_S = 5.0
_NAME_RE = re.compile(r"^t2s[cs]-(\d+)(?:-\d+)?$")
_USER_RE = re.compile(r"^t2su-(\d+)(?:-\d+)?$")


class BedError(RuntimeError):
    pass


def missing_requirements(
    *, iperf: bool = False, proxychains: bool = False, dns: bool = False
) -> list[str]:
    """What keeps the bed from running here; empty when it can run."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    needed = {"ip": "iproute2", "danted": "dante-server", "curl": "curl", "useradd": "passwd"}
    if iperf:
        needed["iperf3"] = "iperf3"
    if proxychains:
        needed["proxychains4"] = "proxychains4"
    if dns:
        needed.update(dnsmasq="dnsmasq-base", dig="dnsutils", tshark="tshark")
    missing += [f"{cmd} (Debian package {pkg})" for cmd, pkg in needed.items() if not which(cmd)]
    return missing


def which(command: str) -> str | None:
    # root's PATH under sudo or CI may lack /usr/sbin, where danted and useradd live
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(command, path=path)


def run(
    args: Sequence[str], *, timeout: float, check: bool = True, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command with a bounded time; on failure raise with its stderr."""
    proc = subprocess.run(
        list(args),
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise BedError(f"{' '.join(args)} -> exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc


def process_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BedError(f"no VmRSS for pid {pid}")


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc: each task's children)."""
    tree = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            tree += process_tree(int(child))
    return tree


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM, wait, then SIGKILL. Returns the exit code, or None if it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return None


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # Treated like Ctrl-C: pytest stops the session (a SystemExit would only fail the current
    # test) and unwinding runs finally blocks, fixture finalizers and atexit: the bed goes down.
    raise KeyboardInterrupt(f"signal {signum}")


def _kill_namespace_processes(ns: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = run(["ip", "netns", "pids", ns], timeout=10, check=False)
        pids = [int(p) for p in proc.stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)


def delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    run(["ip", "netns", "del", ns], timeout=10)


def delete_user(user: str) -> None:
    proc = run(["userdel", user], timeout=20, check=False)
    if proc.returncode not in (0, 6):  # 6: no such user
        raise BedError(f"userdel {user}: {proc.stderr.strip()}")


def reap_stale_beds() -> None:
    """Remove namespaces and users of beds whose process is gone (a killed earlier run)."""
    listing = run(["ip", "netns", "list"], timeout=10, check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME_RE.match(name)
        if match and not pid_alive(int(match.group(1))):
            with contextlib.suppress(BedError, subprocess.TimeoutExpired):
                delete_namespace(name)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
    with open("/etc/passwd") as passwd:
        users = [line.split(":", 1)[0] for line in passwd]
    for user in users:
        match = _USER_RE.match(user)
        if match and not pid_alive(int(match.group(1))):
            with contextlib.suppress(BedError, subprocess.TimeoutExpired):
                delete_user(user)


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class Tun2socks:
    """One tun2socks process running in the client namespace."""

    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM; the exit code, or None if it did not exit within timeout (then killed)."""
        return stop_process(self.process, timeout)


# what the `start_tun2socks` fixture yields: Bed.start_tun2socks with the log path filled in
StartTun2socks = Callable[..., Tun2socks]
