"""The memory row: tun2socks' resident set while idle, and per idle open connection.

Procedure (tun2socks label only; the caller has just started a fresh tun2socks and sent one
probe GET through it):
  1. start `bench/holdserver.py` in the server namespace on TARGET_IP:HOLD_PORT;
  2. wait until the probe's flow has left TIME-WAIT, sample the RSS: "idle";
  3. `netclient.py hold-many` in the client namespace opens N TCP connections through the TUN
     (tun2socks -> danted -> holdserver), each sending nothing, and holds them;
  4. after a settle time, sample the RSS again: (after - idle) / opened is the cost of one idle
     connection (its flow in the stack, its relay, its upstream socket to the proxy);
  5. release the connections (the client reports how many the far side closed meanwhile: a
     flow dropped while idle would hide its cost) and stop the hold server.

The sessions go through the bed's danted, which forks a few hundred children for 10,000
sessions; that works (checked at 10,000) once the fd limits are raised, which `python -m bench`
does for itself and its children (soft RLIMIT_NOFILE up to the hard limit).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from tests.integration import bed as bedlib

from .srvproc import HOLD_SERVER_SCRIPT, start_script, stop

HOLD_PORT = 9009
CONNECTS_IN_FLIGHT = 200  # well below limits.max_half_open (1000): measure memory, not the cap
SETTLE_S = 3.0  # longer than the default TIME-WAIT (2 s), so finished flows are gone


def _read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise bedlib.BedError(f"no answer within {timeout:.0f} s")
    line = proc.stdout.readline()
    try:
        answer: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError as exc:
        raise bedlib.BedError(f"unexpected output {line[:200]!r}") from exc
    return answer


def measure_memory(bed: bedlib.Bed, n: int, time_left: Callable[[float], float]) -> dict[str, Any]:
    try:
        return _measure(bed, n, time_left)
    except (bedlib.BedError, subprocess.TimeoutExpired, ValueError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def _measure(bed: bedlib.Bed, n: int, time_left: Callable[[float], float]) -> dict[str, Any]:
    t2s = bed.tun2socks
    if t2s is None or t2s.process.poll() is not None:
        return {"error": "tun2socks is not running"}
    hold_args = ["--host", bedlib.TARGET_IP, "--port", str(HOLD_PORT)]
    hold_server = start_script(bed, HOLD_SERVER_SCRIPT, hold_args, "holding")
    client: subprocess.Popen[str] | None = None
    try:
        time.sleep(SETTLE_S)
        rss_idle = bedlib.process_rss_bytes(t2s.pid)
        connect_budget = time_left(180)
        client = subprocess.Popen(
            [
                *bed.cli_prefix(),
                *(sys.executable, str(bedlib.NET_CLIENT_SCRIPT), "hold-many"),
                *("--host", bedlib.TARGET_IP, "--port", str(HOLD_PORT), "-n", str(n)),
                *("-c", str(CONNECTS_IN_FLIGHT), "--total-timeout", str(connect_budget - 10)),
                *("--hold-timeout", "120"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        opened = _read_json_line(client, connect_budget)
        time.sleep(SETTLE_S)
        if t2s.process.poll() is not None:
            return {"error": f"tun2socks exited with {t2s.process.returncode}", **opened}
        rss_after = bedlib.process_rss_bytes(t2s.pid)
        # communicate() closes stdin: on that EOF the client reports and closes its connections
        out, _ = client.communicate(timeout=time_left(60))
        final: dict[str, Any] = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    finally:
        if client is not None:
            stop(client)
        stop(hold_server)
    count = int(opened.get("opened", 0))
    return {
        "n": n,
        "opened": count,
        "failed": opened.get("failed"),
        "lost_while_idle": final.get("lost"),
        "connect_s": opened.get("connect_s"),
        "errors": opened.get("errors", []),
        "rss_idle_bytes": rss_idle,
        "rss_after_bytes": rss_after,
        "per_conn_bytes": round((rss_after - rss_idle) / count) if count else None,
    }
