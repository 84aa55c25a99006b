"""Proxies that a failover test or benchmark kills and restarts: danted and tinyproxy in the
bed's server namespace, each connecting out from an address of its own (so that the HTTP
server's /peer names the proxy a request went through). Used by tests/integration/
test_failover.py, test_session_pool.py and bench/failover.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.integration import bed as bedlib
from tests.integration import tinyproxybed
from tests.integration.bedprocs import process_tree


class KillableServer:
    """A server of the test in the server namespace that the test may SIGKILL and start again;
    a subclass says how to run it (`command`) and on which TCP port it listens."""

    name = "server"

    def __init__(self, bed: bedlib.Bed, port: int) -> None:
        self.bed, self.port = bed, port
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        args = ["ip", "netns", "exec", self.bed.srv_ns, *self.command()]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.bed.wait_listening({self.port}, watch=[(f"{self.name}-{self.port}", self.proc)])

    def kill(self) -> None:
        """SIGKILL to the server and its children, all at once (no orderly goodbye)."""
        assert self.proc is not None
        for pid in process_tree(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        # Its workers die a moment later: until the listener is gone, start() would see it.
        deadline = time.monotonic() + 10.0
        while self.port in self.bed.listening_ports() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


class Danted(KillableServer):
    """One danted of the test, in the server namespace, that the test may SIGKILL. With
    `external`, its connections leave from that address of its own (added to lo); without, from
    lo's. `negotiate_s`: how long it waits for a session's request (timeout.negotiate)."""

    name = "danted"

    def __init__(
        self,
        bed: bedlib.Bed,
        port: int,
        external: str | None = None,
        *,
        negotiate_s: int | None = None,
    ) -> None:
        super().__init__(bed, port)
        if external is not None:
            bed.run_srv(["ip", "addr", "replace", f"{external}/32", "dev", "lo"], timeout=10)
        self.external = external
        settings = "" if negotiate_s is None else f"timeout.negotiate: {negotiate_s}\n"
        self.conf = bed.workdir / f"danted-killable-{port}.conf"
        self.conf.write_text(
            f"""logoutput: {bed.workdir / f"danted-killable-{port}.out"}
internal: {bedlib.SRV_VETH_IP} port = {port}
external: {external or "lo"}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
{settings}client pass {{ from: 198.18.0.0/15 to: 0/0 }}
socks pass {{ from: 0/0 to: 198.19.0.0/16 command: connect }}
socks block {{ from: 0/0 to: 0/0 log: connect error }}
"""
        )

    @property
    def url(self) -> str:
        return f"socks5://{bedlib.SRV_VETH_IP}:{self.port}"

    def command(self) -> list[str]:
        danted = bedlib.which("danted") or "danted"
        pid_file = self.bed.workdir / f"danted-killable-{self.port}.pid"
        return [danted, "-f", str(self.conf), "-p", str(pid_file), "-N", "2"]


class Tinyproxy(KillableServer):
    """tinyproxy (HTTP CONNECT) in the server namespace, that the test may SIGKILL and restart.
    `Bind` makes its connections leave from their own address, which /peer then shows."""

    name = "tinyproxy"

    def __init__(self, bed: bedlib.Bed, port: int, external: str) -> None:
        super().__init__(bed, port)
        self.external = external
        bed.run_srv(["ip", "addr", "replace", f"{external}/32", "dev", "lo"], timeout=10)
        self.log_file = bed.workdir / f"tinyproxy-failover-{port}.log"
        self.conf = bed.workdir / f"tinyproxy-failover-{port}.conf"
        text = tinyproxybed.config_text(port, self.log_file, None)
        self.conf.write_text(text + f"Bind {external}\n")

    @property
    def url(self) -> str:
        return f"http://{bedlib.SRV_VETH_IP}:{self.port}"

    def command(self) -> list[str]:
        binary = bedlib.which("tinyproxy") or "tinyproxy"
        return [binary, "-d", "-c", str(self.conf)]


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
