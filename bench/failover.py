"""Failover under load: `sudo python3 -m bench.failover [--seconds 24] [--clients 20]`.

Issue 15's benchmark row. The bed of the integration tests with two danted in the server
namespace (tests/integration/failoverprocs.py: each connects out from its own address, so
the HTTP server's /peer names the proxy); tun2socks with `proxy.url: [first, second]`.
CLIENTS threads in the client namespace open new connections in a loop (tests/integration/
failoverload.py: connect, GET /peer, read) for SECONDS; the first danted gets `kill -9` (the
whole process tree at once) at KILL_AT_S and is started again RESTART_AFTER_S later.

Records: the p50/p99/max of new-connection time (the client's connect, i.e. the handshake
through the TUN whose SYN-ACK waits for the proxy) from the kill on, and for reference
before it; the connections that failed after the first second past the kill; how long after
the restart new flows used the first proxy again. Writes bench/results/<date>-failover.json
and prints the row. Exit status 1 when the issue's bounds are missed (p99 under 1 s, no
failed connection after the first second, back on the first proxy within 10 s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.integration import bed as bedlib
from tests.integration.failoverprocs import Danted, p99

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
FIRST, SECOND = (1090, "198.19.0.31"), (1091, "198.19.0.32")  # port, outgoing address
KILL_AT_S, RESTART_AFTER_S = 3.0, 5.0
P99_BOUND_S, RECOVERY_BOUND_S = 1.0, 10.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0


def measure(bed: bedlib.Bed, workdir: Path, seconds: float, clients: int) -> dict[str, Any]:
    first, second = Danted(bed, *FIRST), Danted(bed, *SECOND)
    try:
        first.start()
        second.start()
        extra = {"proxy": {"url": [first.url, second.url]}, "log": {"level": "warning"}}
        bed.start_tun2socks(workdir / "tun2socks.log", extra=extra)
        args = [*bed.cli_prefix(), *bedlib.helper_command("failoverload")]
        args += [bedlib.TARGET_IP, str(bedlib.HTTP_PORT), str(clients), str(seconds)]
        load = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(KILL_AT_S)
        killed_at = time.time()
        first.kill()
        time.sleep(RESTART_AFTER_S)
        first.start()
        restarted_at = time.time()
        out, err = load.communicate(timeout=seconds + 60)
    finally:
        bed.stop_tun2socks()
        first.stop()
        second.stop()
    lines = out.strip().splitlines()
    if not lines:
        return {"error": f"failoverload printed nothing: {err[-500:]}"}
    rows = json.loads(lines[-1])["rows"]
    before = [r[1] for r in rows if r[0] + r[2] < killed_at]
    since_kill = [r for r in rows if r[0] >= killed_at]
    connect = [r[1] for r in since_kill if not str(r[3]).startswith("error")]
    failed = [r for r in rows if r[0] >= killed_at + 1.0 and str(r[3]).startswith("error")]
    back = [r[0] for r in rows if r[0] >= restarted_at and r[3] == FIRST[1]]
    return {
        "connections": len(rows),
        "connect_before_kill_s": {"p50": percentile(before, 0.5), "p99": p99(before)},
        "connect_since_kill_s": {
            "count": len(connect),
            "p50": percentile(connect, 0.5),
            "p99": p99(connect),
            "max": max(connect, default=0.0),
        },
        "failed_after_first_second": len(failed),
        "failed_examples": [str(r[3]) for r in failed[:5]],
        "back_on_first_after_restart_s": (back[0] - restarted_at) if back else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.failover", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=24.0, help="load duration")
    parser.add_argument("--clients", type=int, default=20, help="looping client threads")
    args = parser.parse_args(argv)
    missing = bedlib.missing_requirements()
    if missing:
        print("bench.failover needs: " + ", ".join(missing), file=sys.stderr)
        return 2
    now = datetime.datetime.now(datetime.UTC)
    stamp = now.strftime("%Y-%m-%dT%H%M%SZ")
    workdir = Path("/tmp") / f"t2s-failover-{stamp}"
    with bedlib.Bed(workdir) as bed:
        result = measure(bed, workdir, args.seconds, args.clients)
    result.update(
        date=now.strftime("%Y-%m-%d %H:%M UTC"),
        clients=args.clients,
        seconds=args.seconds,
        kill_at_s=KILL_AT_S,
        restart_after_s=RESTART_AFTER_S,
        host={"cpus": os.cpu_count(), "load_avg_end": os.getloadavg()},
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stamp}-failover.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    if "error" in result:
        print(f"failover: {result['error']}")
        return 1
    since = result["connect_since_kill_s"]
    back = result["back_on_first_after_restart_s"]
    print(
        f"failover, kill -9 of the first of 2 SOCKS5 proxies under {args.clients} looping "
        f"clients: new-connection p99 {since['p99'] * 1000:.0f} ms (p50 "
        f"{since['p50'] * 1000:.0f} ms, max {since['max'] * 1000:.0f} ms, {since['count']} "
        f"connections), failed after the first second: {result['failed_after_first_second']}, "
        f"back on the first proxy {back if back is None else f'{back:.1f} s'} after its restart"
    )
    print(f"  results: {path}")
    within = (
        since["p99"] < P99_BOUND_S
        and result["failed_after_first_second"] == 0
        and back is not None
        and back < RECOVERY_BOUND_S
    )
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
