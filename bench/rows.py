"""The measurements behind each row of the benchmark table, for one label at a time.

Labels:
  tun2socks     plain clients in the client namespace; their traffic enters the TUN
  socks-danted  the ceiling: the same clients speak SOCKS5 to danted themselves
                (iperf3 under proxychains4, netclient.py with --socks, curl --socks5)

The "remote" row's proxy is 20 ms away: danted behind bench/delayrelay.py (RELAY_PORT), which
holds every chunk 10 ms each way; both labels go through it (tun2socks is restarted with the
relay as its proxy for that row).

A row id (what `--rows` selects) stands for one or more measurements; `MEASUREMENTS` maps each
row to them. Every measurement returns a dict of numbers (or {"error": ...}); for the tun2socks
label the CPU-seconds the tun2socks process used during it are added (/proc/PID/stat), which is
where the CPU row's seconds per GB come from.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.integration import bed as bedlib

LABEL_TUN = "tun2socks"
LABEL_CEILING = "socks-danted"
LABELS = (LABEL_CEILING, LABEL_TUN)  # measured in this order, one measurement at a time

Metrics = dict[str, Any]

# row id -> the measurements it takes (each measured for both labels unless tun-only)
MEASUREMENTS: dict[str, tuple[str, ...]] = {
    "latency": ("latency_c1",),
    "seq": ("seq_n500_c1",),
    "rate": ("rate_c200",),
    "churn": ("churn_n2000_c100",),
    "iperf1": ("up_P1", "down_P1"),
    "iperf4": ("up_P4", "down_P4"),
    "remote": ("latency_remote",),
    "memory": ("memory",),
}
ROW_IDS = tuple(MEASUREMENTS)
TUN_ONLY = {"memory"}
REMOTE = {"remote"}  # measured with tun2socks (and the ceiling's clients) behind the relay
RELAY_PORT = 1090  # bench/delayrelay.py in the server namespace, in front of danted
RELAY_DELAY_MS = 10.0  # each way: a 20 ms round trip

RATE_RUNS = 3  # "200 at once" is over in well under a second: the median of 3 is steadier
CHURN_RUNS = 3  # the "run 3 times"
LATENCY_RUNS = 3
LATENCY_GETS = 200  # sequential GETs per latency run (one curl process)
REMOTE_GETS = 50  # per run of the 20 ms row: each GET takes 3 round trips or more
SEQ_RUNS = 3
SLOW_MS = 5000.0  # the churn row counts connections slower than this
REQUEST_TIMEOUT_S = 15.0  # the C peers' hung connections were counted at 15 s
SETTLE_S = 1.0  # between measurements: TIME-WAIT and CPU settle


class BudgetExhausted(TimeoutError):
    pass


@dataclass
class RunnerSettings:
    iperf_secs: int
    deadline: float  # time.monotonic() by which everything must be done


class Runner:
    def __init__(self, bed: bedlib.Bed, settings: RunnerSettings) -> None:
        self.bed = bed
        self.settings = settings
        self.proxychains_conf = bed.workdir / "proxychains.conf"
        self.proxychains_conf.write_text(
            "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
            f"[ProxyList]\nsocks5 {bedlib.SRV_VETH_IP} {bedlib.SOCKS_PORT}\n"
        )

    def time_left(self, wanted: float) -> float:
        left = self.settings.deadline - time.monotonic()
        if left < wanted / 2 or left < 5:
            raise BudgetExhausted(f"bench time budget exhausted ({left:.0f} s left)")
        return min(wanted, left)

    # -- one measurement, for one label ------------------------------------------------------

    def measure(self, name: str, label: str) -> Metrics:
        """Run measurement `name` for `label`; errors become data so the other rows still run."""
        t2s = self.bed.tun2socks if label == LABEL_TUN else None
        if label == LABEL_TUN and (t2s is None or t2s.process.poll() is not None):
            return {"error": "tun2socks is not running"}
        cpu_before = bedlib.process_cpu_seconds(t2s.pid) if t2s else 0.0
        started = time.monotonic()
        try:
            metrics = self._dispatch(name)(label)
        except BudgetExhausted:
            raise
        except (bedlib.BedError, subprocess.TimeoutExpired, ValueError, OSError) as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        wall = time.monotonic() - started
        if t2s is not None:
            if t2s.process.poll() is not None:
                metrics["error"] = f"tun2socks exited with {t2s.process.returncode}"
                return metrics
            cpu = bedlib.process_cpu_seconds(t2s.pid) - cpu_before
            metrics["tun2socks_cpu_s"] = round(cpu, 3)
            metrics["tun2socks_cpu_pct"] = round(100.0 * cpu / wall, 1)
            if metrics.get("bytes"):
                metrics["cpu_s_per_gb"] = round(cpu / (metrics["bytes"] / 1e9), 3)
        return metrics

    def _dispatch(self, name: str) -> Callable[[str], Metrics]:
        table: dict[str, Callable[[str], Metrics]] = {
            "up_P1": lambda lb: self.iperf(lb, reverse=False, streams=1),
            "down_P1": lambda lb: self.iperf(lb, reverse=True, streams=1),
            "up_P4": lambda lb: self.iperf(lb, reverse=False, streams=4),
            "down_P4": lambda lb: self.iperf(lb, reverse=True, streams=4),
            "rate_c200": self.rate,
            "churn_n2000_c100": self.churn,
            "latency_c1": lambda lb: self.curl_latency(lb, remote=False),
            "latency_remote": lambda lb: self.curl_latency(lb, remote=True),
            "seq_n500_c1": self.sequential,
        }
        return table[name]

    # -- the workloads -------------------------------------------------------------------------

    def iperf_command(self, label: str, *, reverse: bool, streams: int, secs: int) -> list[str]:
        cmd = ["iperf3", "-c", bedlib.TARGET_IP, "-p", str(bedlib.IPERF_PORT), "-t", str(secs)]
        cmd += ["-P", str(streams), "-J", "--connect-timeout", "5000"]
        cmd += ["-R"] if reverse else []
        if label == LABEL_CEILING:
            cmd = ["proxychains4", "-q", "-f", str(self.proxychains_conf), *cmd]
        return cmd

    def iperf(self, label: str, *, reverse: bool, streams: int) -> Metrics:
        secs = self.settings.iperf_secs
        cmd = self.iperf_command(label, reverse=reverse, streams=streams, secs=secs)
        proc = self.bed.run_cli(cmd, timeout=self.time_left(secs + 30))
        try:
            end = json.loads(proc.stdout)["end"]
            received = end["sum_received"]
            bits, moved = received["bits_per_second"], received["bytes"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"iperf3 rc {proc.returncode}: {(proc.stdout + proc.stderr)[-300:]}"
            ) from exc
        return {
            "gbit_s": round(bits / 1e9, 3),
            "bytes": moved,
            "retransmits": end.get("sum_sent", {}).get("retransmits"),
        }

    def get_many(self, label: str, *, n: int, c: int, total_timeout: float) -> Metrics:
        args = ["get-many", "--host", bedlib.TARGET_IP, "--path", "/small", "-n", str(n)]
        args += ["-c", str(c), "--req-timeout", str(REQUEST_TIMEOUT_S)]
        args += ["--total-timeout", str(total_timeout), "--slow-ms", str(SLOW_MS)]
        if label == LABEL_CEILING:
            args += ["--socks", f"{bedlib.SRV_VETH_IP}:{bedlib.SOCKS_PORT}"]
        result = self.bed.netclient(args, timeout=self.time_left(total_timeout + 20))
        if "ok" not in result:
            raise ValueError(str(result)[:300])
        return result

    def rate(self, label: str) -> Metrics:
        runs = [
            self._settled(self.get_many(label, n=200, c=200, total_timeout=40))
            for _ in range(RATE_RUNS)
        ]
        return {
            "req_per_s": statistics.median(r["rate_per_s"] or 0.0 for r in runs),
            "runs_req_per_s": [r["rate_per_s"] for r in runs],
            "fail": sum(r["fail"] for r in runs),
            "errors": _errors(runs),
        }

    def churn(self, label: str) -> Metrics:
        runs = [
            self._settled(self.get_many(label, n=2000, c=100, total_timeout=90))
            for _ in range(CHURN_RUNS)
        ]
        return {
            "fail": sum(r["fail"] for r in runs),
            "slow": sum(r["slow"] for r in runs),
            "connections": sum(r["n"] for r in runs),
            "req_per_s": statistics.median(r["rate_per_s"] or 0.0 for r in runs),
            "runs_req_per_s": [r["rate_per_s"] for r in runs],
            "max_ms": max((r["lat_ms"]["max"] or 0.0) for r in runs),
            "errors": _errors(runs),
        }

    def sequential(self, label: str) -> Metrics:
        """500 GETs one after the other: connections per second, median of SEQ_RUNS runs."""
        runs = [
            self._settled(self.get_many(label, n=500, c=1, total_timeout=60))
            for _ in range(SEQ_RUNS)
        ]
        return {
            "req_per_s": statistics.median(r["rate_per_s"] or 0.0 for r in runs),
            "runs_req_per_s": [r["rate_per_s"] for r in runs],
            "fail": sum(r["fail"] for r in runs),
            "errors": _errors(runs),
        }

    def curl_command(self, label: str, *, gets: int, remote: bool) -> list[str]:
        """One curl process making `gets` GETs one after the other: each is a new connection
        (HTTP/1.0, the server closes); per GET one line of timings on stderr (the bodies go to
        stdout: the server matches the path exactly, so no URL glob)."""
        url = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}/small"
        cmd = ["curl", "-sS", "--http1.0", "--max-time", str(REQUEST_TIMEOUT_S)]
        cmd += ["-w", "%{stderr}" + CURL_FORMAT, *([url] * gets)]
        if label == LABEL_CEILING:
            port = RELAY_PORT if remote else bedlib.SOCKS_PORT
            cmd[1:1] = ["--socks5", f"{bedlib.SRV_VETH_IP}:{port}"]
        return cmd

    def curl_latency(self, label: str, *, remote: bool) -> Metrics:
        """Small GET p50 and time to connect p50 (curl's time_connect: for tun2socks the SYN-ACK
        of the TUN, which waits for the proxy; for the ceiling curl's own TCP connect to the
        proxy, or, with the SOCKS5 handshake, whatever this curl counts in it)."""
        gets = REMOTE_GETS if remote else LATENCY_GETS
        runs = []
        for _ in range(LATENCY_RUNS):
            cmd = self.curl_command(label, gets=gets, remote=remote)
            proc = self.bed.run_cli(cmd, timeout=self.time_left(gets * REQUEST_TIMEOUT_S / 4))
            runs.append(parse_curl_timings(proc.stderr, gets))
            time.sleep(SETTLE_S / 2)
        p50s = [r["p50_ms"] for r in runs if r["p50_ms"] is not None]
        if not p50s:
            raise ValueError(f"no successful GET: {[r['errors'] for r in runs]}")
        return {
            "p50_ms": statistics.median(p50s),
            "runs_p50_ms": p50s,
            "connect_p50_ms": statistics.median(
                r["connect_p50_ms"] for r in runs if r["connect_p50_ms"] is not None
            ),
            "p99_ms": max(r["p99_ms"] or 0.0 for r in runs),
            "fail": sum(r["fail"] for r in runs),
            "errors": sorted({e for r in runs for e in r["errors"]})[:5],
        }

    @staticmethod
    def _settled(result: Metrics) -> Metrics:
        time.sleep(SETTLE_S / 2)
        return result


CURL_FORMAT = "%{http_code} %{size_download} %{time_connect} %{time_total}\\n"


def parse_curl_timings(out: str, expected: int) -> Metrics:
    """curl -w CURL_FORMAT lines -> p50 of the total and of the connect time (ms); a GET counts
    as failed unless it answered 200 with a body (missing lines are failures too)."""
    totals, connects, errors = [], [], []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) != 4:
            continue
        code, size, connect_s, total_s = fields
        if code != "200" or int(size) == 0:
            errors.append(f"HTTP {code}, {size} bytes")
            continue
        connects.append(float(connect_s) * 1000.0)
        totals.append(float(total_s) * 1000.0)
    return {
        "p50_ms": round(statistics.median(totals), 3) if totals else None,
        "connect_p50_ms": round(statistics.median(connects), 3) if connects else None,
        "p99_ms": round(sorted(totals)[min(len(totals) - 1, len(totals) * 99 // 100)], 3)
        if totals
        else None,
        "fail": expected - len(totals),
        "errors": sorted(set(errors))[:5],
    }


def _errors(runs: list[Metrics]) -> list[str]:
    return sorted({e for r in runs for e in r.get("errors", [])})[:5]
