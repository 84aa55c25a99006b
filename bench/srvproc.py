"""The bench's own helper processes in the bed's server namespace (bench/holdserver.py,
bench/delayrelay.py): started as scripts, ready once they print their first line, stopped with
SIGTERM (then SIGKILL) when the measurement is done."""

from __future__ import annotations

import select
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.integration import bed as bedlib

BENCH_DIR = Path(__file__).resolve().parent
DELAY_RELAY_SCRIPT = BENCH_DIR / "delayrelay.py"
HOLD_SERVER_SCRIPT = BENCH_DIR / "holdserver.py"
READY_TIMEOUT_S = 15.0


def start_script(
    bed: bedlib.Bed, script: Path, args: Sequence[str], ready: str
) -> subprocess.Popen[str]:
    """Run `script` in the server namespace; return once its first line starts with `ready`."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", bed.srv_ns, sys.executable, str(script), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
    if not readable or not proc.stdout.readline().startswith(ready):
        stop(proc)
        raise bedlib.BedError(f"{script.name} did not start")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_delay_relay(bed: bedlib.Bed, port: int, delay_ms: float) -> subprocess.Popen[str]:
    """bench/delayrelay.py on the proxy's address and `port`, in front of the bed's danted."""
    listen = f"{bedlib.SRV_VETH_IP}:{port}"
    to = f"{bedlib.SRV_VETH_IP}:{bedlib.SOCKS_PORT}"
    args = ["--listen", listen, "--to", to, "--delay-ms", str(delay_ms)]
    return start_script(bed, DELAY_RELAY_SCRIPT, args, "relaying")
