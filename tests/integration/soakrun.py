"""A bounded mixed-traffic soak of tun2socks on the bed, shared by test_soak.py (60 s) and
`python -m bench.soak` (20 minutes by default).

Traffic (loadgen.py soak) comes in rounds through the bed's danted: small GETs over IPv4 and
IPv6, a 1 MiB download and upload with digests checked, a connection refused by the proxy,
echo sessions, and a fixed set of idle connections held for the whole run and checked each
round. After each round the traffic pauses; in the pause tun2socks's RSS and open fds are
sampled (the lowest of a few readings, so that the last flows' closing does not count).
Verdict: from the 25% mark to the end every sample stays within 5% of the sample taken at the
mark, for RSS and for open fds.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import bed as bedlib
import robust_helpers as rh

FLAT_TOLERANCE = 0.05
START_FRACTION = 0.25


def flatness(samples: list[dict[str, float]], duration: float, key: str) -> dict[str, Any]:
    """Largest relative deviation of `key` from its value at the 25% mark, from there on."""
    later = [s for s in samples if s["t"] >= START_FRACTION * duration]
    if len(later) < 2:
        return {"ok": False, "reason": f"only {len(later)} samples after the 25% mark"}
    reference = later[0][key]
    deviation = max(abs(s[key] - reference) for s in later) / reference
    return {
        "ok": deviation <= FLAT_TOLERANCE,
        "reference": reference,
        "max_deviation": round(deviation, 4),
        "samples": len(later),
    }


def run(bed: bedlib.Bed, start: Callable[..., bedlib.Tun2socks], duration: float) -> dict[str, Any]:
    """Soak for `duration` seconds; the samples, the traffic totals and the verdicts."""
    with rh.raised_nofile_limit(), rh.async_servers(bed, processes=1):
        t2s = start()
        args = [
            sys.executable, str(rh.LOADGEN), "soak",
            "--http-host", bedlib.TARGET_IP, "--http-host6", bedlib.TARGET_IP6,
            "--echo-host", bedlib.TARGET_IP, "--echo-port", str(rh.ECHO_PORT),
            "--duration", str(duration),
        ]  # fmt: skip
        gen = subprocess.Popen(
            [*bed.cli_prefix(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        samples: list[dict[str, float]] = []
        summary: dict[str, Any] = {}
        started = time.monotonic()
        try:
            assert gen.stdout is not None
            while True:
                ready, _, _ = select.select([gen.stdout], [], [], 60)
                line = gen.stdout.readline() if ready else ""
                if not line:
                    break
                event = json.loads(line)
                if event["event"] == "round":
                    samples.append(_quiet_sample(t2s.pid, event["t"]))
                elif event["event"] == "done":
                    summary = event
                    break
                if time.monotonic() - started > duration + 120:
                    break
        finally:
            if gen.poll() is None:
                gen.kill()
            _, err = gen.communicate(timeout=10)
        alive = t2s.process.poll() is None
    return {
        "duration": duration,
        "traffic": summary,
        "loadgen_stderr": err[-500:],
        "tun2socks_alive": alive,
        "rss": flatness(samples, duration, "rss"),
        "fds": flatness(samples, duration, "fds"),
        "samples": samples,
    }


def _quiet_sample(pid: int, t: float) -> dict[str, float]:
    readings = []
    for _ in range(3):
        time.sleep(0.12)
        readings.append((rh.rss(pid), rh.fd_count(pid)))
    return {
        "t": t,
        "rss": min(r for r, _ in readings),
        "fds": min(f for _, f in readings),
    }
