"""Proxies that a failover test or benchmark kills and restarts: danted and tinyproxy in the
bed's server namespace, each connecting out from an address of its own (so that the HTTP
server's /peer names the proxy a request went through). Used by tests/integration/
test_failover.py and bench/failover.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.integration import bed as bedlib
from tests.integration import tinyproxybed


class Danted:
    """One danted of the test, in the server namespace, that the test may SIGKILL."""

    def __init__(self, bed: bedlib.Bed, port: int, external: str) -> None:
        self.bed, self.port, self.external = bed, port, external
        bed.run_srv(["ip", "addr", "replace", f"{external}/32", "dev", "lo"], timeout=10)
        self.conf = bed.workdir / f"danted-failover-{port}.conf"
        self.conf.write_text(
            f"""logoutput: {bed.workdir / f"danted-failover-{port}.out"}
internal: {bedlib.SRV_VETH_IP} port = {port}
external: {external}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 198.18.0.0/15 to: 0/0 }}
socks pass {{ from: 0/0 to: 198.19.0.0/16 command: connect }}
socks block {{ from: 0/0 to: 0/0 log: connect error }}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"socks5://{bedlib.SRV_VETH_IP}:{self.port}"

    def start(self) -> None:
        danted = bedlib.which("danted") or "danted"
        pid_file = self.bed.workdir / f"danted-failover-{self.port}.pid"
        args = ["ip", "netns", "exec", self.bed.srv_ns, danted, "-f", str(self.conf)]
        args += ["-p", str(pid_file), "-N", "2"]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + bedlib.READY_TIMEOUT_S
        while (
            f"{bedlib.SRV_VETH_IP}:{self.port} "
            not in self.bed.run_srv(["ss", "-Hltn"], timeout=10).stdout
        ):
            assert self.proc.poll() is None and time.monotonic() < deadline, "danted not up"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL to danted and its children, all at once (no orderly goodbye)."""
        assert self.proc is not None
        for pid in process_tree(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def process_tree(pid: int) -> list[int]:
    tree = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            tree += process_tree(int(child))
    return tree


class Tinyproxy:
    """tinyproxy (HTTP CONNECT) in the server namespace, that the test may SIGKILL and restart.
    `Bind` makes its connections leave from their own address, which /peer then shows."""

    def __init__(self, bed: bedlib.Bed, port: int, external: str) -> None:
        self.bed, self.port, self.external = bed, port, external
        bed.run_srv(["ip", "addr", "replace", f"{external}/32", "dev", "lo"], timeout=10)
        self.log_file = bed.workdir / f"tinyproxy-failover-{port}.log"
        self.conf = bed.workdir / f"tinyproxy-failover-{port}.conf"
        text = tinyproxybed.config_text(port, self.log_file, None)
        self.conf.write_text(text + f"Bind {external}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{bedlib.SRV_VETH_IP}:{self.port}"

    def start(self) -> None:
        binary = bedlib.which("tinyproxy") or "tinyproxy"
        args = ["ip", "netns", "exec", self.bed.srv_ns, binary, "-d", "-c", str(self.conf)]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + bedlib.READY_TIMEOUT_S
        while (
            f"{bedlib.SRV_VETH_IP}:{self.port} "
            not in self.bed.run_srv(["ss", "-Hltn"], timeout=10).stdout
        ):
            assert self.proc.poll() is None and time.monotonic() < deadline, "tinyproxy not up"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        for pid in process_tree(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
