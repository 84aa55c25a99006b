"""Soak tun2socks for a long while on the test bed: `sudo python3 -m bench.soak [--minutes 20]`.

Bounded mixed traffic in rounds (tests/integration/soakrun.py: GETs over IPv4 and IPv6, 1 MiB
downloads and uploads with digests, refused connections, echo sessions, idle connections held
throughout, UDP echo sessions that come and go, DNS queries over UDP and TCP through the
forwarder to the bed's dnsmasq); tun2socks's RSS and open fds are sampled in the pause after
each round and must stay within 5% of their value at the 25% mark until the end. Writes
bench/results/<date>-soak.json and prints the verdict; exit status 1 if not flat or if any
traffic failed. The 60-second version runs in the test suite (tests/integration/test_soak.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from tests.integration import bed as bedlib
from tests.integration import soakrun

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--log-level", default="warning", help="tun2socks log level")
    args = parser.parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    workdir = Path("/tmp") / f"t2s-soak-{stamp}"
    with bedlib.Bed(workdir, dns=True) as bed:

        def start(extra: dict[str, Any]) -> bedlib.Tun2socks:
            extra = {**extra, "log": {"level": args.log_level}}
            return bed.start_tun2socks(workdir / "tun2socks.log", extra=extra)

        started = time.monotonic()
        result = soakrun.run(bed, start, args.minutes * 60)
        result["wall_seconds"] = round(time.monotonic() - started, 1)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stamp}-soak.json"
    path.write_text(json.dumps(result, indent=1))
    traffic = result["traffic"]
    print(f"soak {args.minutes} min: {traffic.get('rounds')} rounds, ok {traffic.get('ok')}, "
          f"failed {traffic.get('failed')}")  # fmt: skip
    for key in ("rss", "fds", "bounded"):
        print(f"  {key}: {result[key]}")
    print(f"  results: {path}")
    flat = result["rss"]["ok"] and result["fds"]["ok"] and result["bounded"]["ok"]
    return 0 if flat and traffic.get("failed") == 0 and result["tun2socks_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
