"""`ssh -D` in the bed: a real OpenSSH dynamic forward (a SOCKS5 server that knows CONNECT only).

An sshd runs in the server namespace on SSHD_PORT of the server's veth address only, with its
own configuration, host key and authorized key, all generated in a temporary directory; an
`ssh -N -D` client in the same namespace logs in to it as root with the generated key and
listens for SOCKS clients on SRV_VETH_IP:SOCKS_PORT. Nothing listens beyond the bed's
addresses, nothing is written outside the temporary directory: sshd's privilege separation
directory (/run/sshd) is a tmpfs mounted in the private mount namespace `ip netns exec` gives it.

    with sshbed.ssh_dynamic(bed) as url:   # socks5://198.18.0.2:1084
        ...
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.integration import bed as bedlib

SSHD = "/usr/sbin/sshd"
SSHD_PORT = 2222
SOCKS_PORT = 1084
READY_TIMEOUT_S = 15.0


def missing() -> list[str]:
    """What the ssh -D bed needs and this machine lacks (Debian packages named)."""
    needs = {SSHD: "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client"}
    return [
        f"{command} ({package})"
        for command, package in needs.items()
        if not (os.access(command, os.X_OK) if command.startswith("/") else shutil.which(command))
    ]


def _sshd_config(workdir: Path) -> str:
    return f"""Port {SSHD_PORT}
ListenAddress {bedlib.SRV_VETH_IP}
HostKey {workdir / "host_key"}
PidFile {workdir / "sshd.pid"}
AuthorizedKeysFile {workdir / "authorized_keys"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
AllowTcpForwarding yes
PermitTTY no
"""


def _start(bed: bedlib.Bed, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", bed.srv_ns, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stopped whole
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_listening(
    bed: bedlib.Bed, port: int, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    listening = f"{bedlib.SRV_VETH_IP}:{port} "
    while listening not in bed.run_srv(["ss", "-Hltn"], timeout=10).stdout:
        if process.poll() is not None or time.monotonic() > deadline:
            raise bedlib.BedError(f"nothing listens on port {port}: {log.read_text()[-800:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def ssh_dynamic(bed: bedlib.Bed) -> Iterator[str]:
    """sshd and `ssh -N -D` in the server namespace; yields the SOCKS5 URL. Cleans up even
    when starting fails."""
    workdir = Path(tempfile.mkdtemp(prefix="t2s-sshbed-"))
    started: list[subprocess.Popen[bytes]] = []
    try:
        for key in ("host_key", "user_key"):
            bedlib.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / key)],
                timeout=30,
            )
        shutil.copy(workdir / "user_key.pub", workdir / "authorized_keys")
        (workdir / "sshd_config").write_text(_sshd_config(workdir))
        sshd = f"{SSHD} -D -e -f {shlex.quote(str(workdir / 'sshd_config'))}"
        # /run/sshd must exist for sshd; a tmpfs over /run in this private mount namespace
        mount = "mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 755 /run/sshd"
        sshd_log = workdir / "sshd.log"
        started.append(_start(bed, ["sh", "-c", f"{mount} && exec {sshd}"], sshd_log))
        _wait_listening(bed, SSHD_PORT, started[-1], sshd_log)
        client = [
            *("ssh", "-N", "-D", f"{bedlib.SRV_VETH_IP}:{SOCKS_PORT}"),
            *("-i", str(workdir / "user_key"), "-p", str(SSHD_PORT)),
            *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
            *("-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-F", "/dev/null"),
            f"root@{bedlib.SRV_VETH_IP}",
        ]
        ssh_log = workdir / "ssh.log"
        started.append(_start(bed, client, ssh_log))
        _wait_listening(bed, SOCKS_PORT, started[-1], ssh_log)
        yield f"socks5://{bedlib.SRV_VETH_IP}:{SOCKS_PORT}"
    finally:
        for process in reversed(started):
            _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)
