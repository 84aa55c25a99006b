"""Run a real Dante SOCKS server (``danted``) for integration tests.

Plain functions, no pytest fixtures: a test module wraps them in its own fixtures. Everything is
bounded in time, and ``DantedProcess.stop`` kills the whole process group danted runs in (it forks
workers), so nothing outlives a test even when it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DANTED = "danted"


def danted_skip_reason() -> str | None:
    """Why danted-based tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (danted switches users; the auth tests create a system user)"
    if shutil.which(DANTED) is None:
        return "danted not installed (Debian package dante-server)"
    return None


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's choice, so it is free at this moment)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def loopback_config(
    port: int,
    *,
    socksmethod: str = "none",
    logoutput: Path | None = None,
    host: str = "127.0.0.1",
    commands: str = "connect",
) -> str:
    """A danted.conf for a server on ``host:port`` that only relays to 127.0.0.0/8.

    ``socksmethod`` is ``none`` or ``username`` (RFC 1929, checked against system users).
    """
    log_line = f"logoutput: {logoutput}\n" if logoutput is not None else ""
    return (
        f"{log_line}"
        f"internal: {host} port = {port}\n"
        "external: lo\n"
        "clientmethod: none\n"
        f"socksmethod: {socksmethod}\n"
        "user.privileged: root\n"
        "user.unprivileged: nobody\n"
        "timeout.negotiate: 10\n"
        "client pass { from: 127.0.0.0/8 to: 0/0 }\n"
        f"socks pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 command: {commands} }}\n"
        "socks block { from: 0/0 to: 0/0 log: connect error }\n"
    )


def bed_config(log_path: Path, internal: str, port: int, method: str, *, by_name: bool) -> str:
    """The configuration of the bed's proxies (bed.py): on `internal`, clients of the TUN's
    prefixes, CONNECT and UDP ASSOCIATE to the bed's target prefixes; `method` none or
    username. by_name: CONNECTs by name (SOCKS5 ATYP=DOMAINNAME) to the test zone are logged."""
    by_name_rule = "socks pass { from: 0/0 to: .test command: connect\n  log: connect }\n"
    return f"""logoutput: {log_path}
internal: {internal} port = {port}
external: lo
external.rotation: route
clientmethod: none
socksmethod: {method}
user.privileged: root
user.unprivileged: nobody
timeout.negotiate: 10
# UDP: replies from any peer reach the client (endpoint-independent mapping), not only from
# the destination the client wrote to. The relay's client-side socket gets a large receive
# buffer (udpassociate rules below), so that a busy machine does not lose datagrams while
# danted waits for the CPU.
udp.connectdst: no
client pass {{ from: 198.18.0.0/15 to: 0/0 }}
client block {{ from: 0/0 to: 0/0 log: connect error }}
{by_name_rule if by_name else ""}socks pass {{ from: 0/0 to: 198.19.0.0/16 command: connect }}
socks pass {{ from: 0/0 to: fd00:c8::/32 command: connect }}
socks pass {{ from: 0/0 to: 198.19.0.0/16 command: udpassociate
  internal.socket.so_rcvbuf: 4194304 }}
socks pass {{ from: 0/0 to: fd00:c8::/32 command: udpassociate
  internal.socket.so_rcvbuf: 4194304 }}
socks pass {{ from: 198.19.0.0/16 to: 0/0 command: udpreply }}
socks pass {{ from: fd00:c8::/32 to: 0/0 command: udpreply }}
socks block {{ from: 0/0 to: 0/0 log: connect error }}
"""


def far_proxy_config(log_path: Path, address: str, port: int) -> str:
    """A no-auth proxy on `address` that connects out from that address (bed.start_far_proxy)."""
    return f"""logoutput: {log_path}
internal: {address} port = {port}
external: {address}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 198.18.0.0/15 to: 0/0 }}
socks pass {{ from: 0/0 to: 198.19.0.0/16 command: connect }}
socks block {{ from: 0/0 to: 0/0 log: connect error }}
"""


@dataclass
class DantedProcess:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    workdir: Path

    @property
    def log_path(self) -> Path:
        return self.workdir / "danted.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM danted (it stops its workers), then SIGKILL whatever is left of its group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        # Workers may linger after the main process is gone: the group id is still ours.
        _signal_group(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout)


def start_danted(
    config: str, workdir: Path, *, host: str, port: int, ready_timeout: float = 10.0
) -> DantedProcess:
    """Write ``config`` into ``workdir``, start danted in the foreground, wait until it listens.

    ``config`` should log to ``workdir / "danted.log"`` (see ``loopback_config``) so that a
    failure to start can say why.
    """
    conf = workdir / "danted.conf"
    conf.write_text(config)
    process = subprocess.Popen(
        [DANTED, "-f", str(conf), "-p", str(workdir / "danted.pid")],
        stdin=subprocess.DEVNULL,
        stdout=(workdir / "danted.stdout").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so stop() reaches the workers
    )
    server = DantedProcess(process, host, port, workdir)
    try:
        _wait_listening(server, ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_listening(server: DantedProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            stdout = (server.workdir / "danted.stdout").read_text(errors="replace")
            raise RuntimeError(
                f"danted exited with {server.process.returncode}: {stdout} {server.log_text()}"
            )
        try:
            with socket.create_connection((server.host, server.port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"danted not listening on {server.port} after {timeout} s")
        time.sleep(0.05)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def create_system_user(name: str, password: str) -> None:
    """A system user without home or shell, for danted's ``socksmethod: username``."""
    subprocess.run(
        ["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True, timeout=30)
    except BaseException:
        remove_system_user(name)
        raise


def remove_system_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True, timeout=30, check=False)
