"""A bounded mixed-traffic soak of tun2socks on the bed, shared by test_soak.py (60 s) and
`python -m bench.soak` (20 minutes by default).

Traffic (loadgen.py soak) comes in rounds through the bed's danted: small GETs over IPv4 and
IPv6, a 1 MiB download and upload with digests checked, a connection refused by the proxy,
echo sessions, and a fixed set of idle connections held for the whole run and checked each
round. UDP: new sockets each round echo datagrams (one fragmented) through UDP ASSOCIATE; their
sessions run idle and close before the round ends (a short `udp.idle_timeout`), so sessions
come and go all run long. DNS, on a bed with dnsmasq (`Bed(dns=True)`): queries at the
client's resolver over UDP and TCP, new names every round through a small cache, cache hits,
a TXT and an NXDOMAIN, forwarded through the proxy to dnsmasq.
After each round the traffic pauses; in the pause tun2socks's RSS and open fds are sampled (the
lowest of a few readings, so that the last flows' closing does not count). Verdict: from the
25% mark to the end every sample stays within 5% of the sample taken at the mark, for RSS and
for open fds; at the end, no UDP session is left and the DNS cache is within its size.
"""

from __future__ import annotations

import json
import select
import subprocess
import time
from collections.abc import Callable
from typing import Any

from tests.integration import apiclient, dnsbed
from tests.integration import bed as bedlib
from tests.integration import robust_helpers as rh

FLAT_TOLERANCE = 0.05
START_FRACTION = 0.25
UDP_IDLE_S = 1.0  # udp.idle_timeout: each round's sessions close within the round
DNS_CACHE_SIZE = 64  # small, so that new names turn the cache over within the first rounds


def soak_config(bed: bedlib.Bed) -> dict[str, Any]:
    """tun2socks settings of the soak: short UDP sessions; DNS through the proxy to dnsmasq."""
    config: dict[str, Any] = {"udp": {"idle_timeout": UDP_IDLE_S}}
    if bed.dns:
        upstream = f"tcp://{bedlib.TARGET_IP}"
        config["dns"] = {"upstreams": [upstream], "cache": {"size": DNS_CACHE_SIZE}}
    return config


def traffic_args(bed: bedlib.Bed, duration: float) -> list[str]:
    args = [
        *rh.LOADGEN, "soak",
        "--http-host", bedlib.TARGET_IP, "--http-host6", bedlib.TARGET_IP6,
        "--echo-host", bedlib.TARGET_IP, "--echo-port", str(rh.ECHO_PORT),
        "--udp-host", bedlib.TARGET_IP, "--udp-host6", bedlib.TARGET_IP6,
        "--udp-port", str(bedlib.UDP_ECHO_PORTS[0]), "--udp-settle", str(UDP_IDLE_S + 1.0),
        "--duration", str(duration),
    ]  # fmt: skip
    if bed.dns:
        args += ["--dns-server", dnsbed.CLIENT_RESOLVER, "--dns-name", dnsbed.ZONE_NAME]
        args += ["--dns-expect", bedlib.TARGET_IP]
    return args


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
    bed.start_optional_servers(udp_echo=True)
    with rh.raised_nofile_limit(), rh.async_servers(bed, processes=1):
        t2s = start(extra=soak_config(bed))
        gen = subprocess.Popen(
            [*bed.cli_prefix(), *traffic_args(bed, duration)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
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
        components = apiclient.get_json(bed, "/stats")["components"] if alive else {}
    return {
        "duration": duration,
        "traffic": summary,
        "loadgen_stderr": err[-500:],
        "tun2socks_alive": alive,
        "rss": flatness(samples, duration, "rss"),
        "fds": flatness(samples, duration, "fds"),
        "udp": components.get("udp", {}),
        "dns": components.get("dns", {}),
        "bounded": bounded(bed, components),
        "samples": samples,
    }


def bounded(bed: bedlib.Bed, components: dict[str, dict[str, int]]) -> dict[str, Any]:
    """UDP sessions all closed (their idle timeout has passed), DNS cache within its size."""
    udp, dns = components.get("udp", {}), components.get("dns", {})
    checks = {
        "udp sessions closed": udp.get("sessions") == 0 and udp.get("datagrams_down", 0) > 0,
    }
    if bed.dns:
        checks["dns cache within its size"] = 0 < dns.get("cache_entries", 0) <= DNS_CACHE_SIZE
        checks["dns nothing pending"] = dns.get("pending") == 0 and dns.get("queries", 0) > 0
    return {"ok": all(checks.values()), **checks}


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
