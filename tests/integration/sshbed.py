"""`ssh -D` in the bed: a real OpenSSH dynamic forward (a SOCKS5 server that knows CONNECT only).

An sshd runs in the server namespace on SSHD_PORT of the server's veth address only, with its
own configuration, host key and authorized key, all generated in a temporary directory; an
`ssh -N -D` client in the same namespace logs in to it as root with the generated key and
listens for SOCKS clients on SRV_VETH_IP:SOCKS_PORT. Nothing listens beyond the bed's
addresses; nothing is written outside the temporary directory but the two logs, which go with
the bed's servers' logs (bed.workdir); sshd's privilege separation directory (/run/sshd) is a
tmpfs mounted in the private mount namespace `ip netns exec` gives it.

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
from collections.abc import Iterator
from pathlib import Path

from tests.integration import bed as bedlib

SSHD = "/usr/sbin/sshd"
SSHD_PORT = 2222
SOCKS_PORT = 1084


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
        # The logs go with the bed's servers' logs, where bed.wait_listening quotes them from.
        started.append(
            _start(bed, ["sh", "-c", f"{mount} && exec {sshd}"], bed.workdir / "sshd.log")
        )
        bed.wait_listening({SSHD_PORT}, watch=[("sshd", started[-1])])
        client = [
            *("ssh", "-N", "-D", f"{bedlib.SRV_VETH_IP}:{SOCKS_PORT}"),
            *("-i", str(workdir / "user_key"), "-p", str(SSHD_PORT)),
            *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
            *("-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-F", "/dev/null"),
            f"root@{bedlib.SRV_VETH_IP}",
        ]
        started.append(_start(bed, client, bed.workdir / "ssh-dynamic.log"))
        bed.wait_listening({SOCKS_PORT}, watch=[("ssh-dynamic", started[-1])])
        yield f"socks5://{bedlib.SRV_VETH_IP}:{SOCKS_PORT}"
    finally:
        for process in reversed(started):
            _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)
