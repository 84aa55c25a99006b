"""Benchmark tun2socks on the namespace bed of the integration tests: `sudo python -m bench`.

Two labels, measured back to back on one bed:
  tun2socks     plain clients in the client namespace; their traffic enters the TUN
  socks-danted  the ceiling: the same clients speak SOCKS5 to danted themselves
                (iperf3 under proxychains4, netclient.py with --socks)

Tests: iperf3 upload and download (1 stream), connection rate (2000 GETs, 100 at a time, and
200 at once) and small-GET latency p50 (200 sequential GETs); the GETs use
tests/integration/netclient.py. Writes bench/results/<date>.json and the table between the
markers in bench/README.md. Every step has a timeout; the whole run stays under five minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# bed.py lives with the integration tests, which use it the same way (one bed, one definition)
sys.path.insert(0, str(REPO / "tests" / "integration"))
import bed as bedlib  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
README = REPO / "bench" / "README.md"
BEGIN_MARK = "<!-- bench-results:begin -->"
END_MARK = "<!-- bench-results:end -->"
LABEL_TUN = "tun2socks"
LABEL_CEILING = "socks-danted"
TOTAL_BUDGET_S = 280.0

Metrics = dict[str, Any]


class Runner:
    def __init__(self, bed: bedlib.Bed, args: argparse.Namespace, deadline: float) -> None:
        self.bed = bed
        self.args = args
        self.deadline = deadline
        self.proxychains_conf = bed.workdir / "proxychains.conf"
        self.proxychains_conf.write_text(
            "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
            f"[ProxyList]\nsocks5 {bedlib.SRV_VETH_IP} {bedlib.SOCKS_PORT}\n"
        )

    def time_left(self, wanted: float) -> float:
        left = self.deadline - time.monotonic()
        if left < 5:
            raise TimeoutError("bench time budget exhausted")
        return min(wanted, left)

    def measure(self, label: str, fn: Callable[[str], Metrics]) -> Metrics:
        """Run one test; add the CPU share of tun2socks (tun label) over its wall time."""
        t2s = self.bed.tun2socks if label == LABEL_TUN else None
        cpu_before = bedlib.process_cpu_seconds(t2s.pid) if t2s else 0.0
        started = time.monotonic()
        try:
            metrics = fn(label)
        except (bedlib.BedError, subprocess.TimeoutExpired, TimeoutError, ValueError) as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        wall = time.monotonic() - started
        if t2s is not None and t2s.process.poll() is None:
            cpu = bedlib.process_cpu_seconds(t2s.pid) - cpu_before
            metrics["tun2socks_cpu_pct"] = round(100.0 * cpu / wall, 1)
        return metrics

    def iperf(self, label: str, *, reverse: bool) -> Metrics:
        secs = self.args.iperf_secs
        cmd = ["iperf3", "-c", bedlib.TARGET_IP, "-p", str(bedlib.IPERF_PORT), "-t", str(secs)]
        cmd += ["-J", "--connect-timeout", "5000", *(["-R"] if reverse else [])]
        if label == LABEL_CEILING:
            cmd = ["proxychains4", "-q", "-f", str(self.proxychains_conf), *cmd]
        proc = self.bed.run_cli(cmd, timeout=self.time_left(secs + 20))
        try:
            end = json.loads(proc.stdout)["end"]
            bits = end["sum_received"]["bits_per_second"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(
                f"iperf3 rc {proc.returncode}: {(proc.stdout + proc.stderr)[-300:]}"
            ) from exc
        return {"gbit_s": round(bits / 1e9, 3), "retransmits": end["sum_sent"].get("retransmits")}

    def get_many(self, label: str, *, n: int, c: int) -> Metrics:
        args = ["get-many", "--host", bedlib.TARGET_IP, "--path", "/small", "-n", str(n)]
        args += ["-c", str(c), "--req-timeout", "15", "--total-timeout", "90"]
        if label == LABEL_CEILING:
            args += ["--socks", f"{bedlib.SRV_VETH_IP}:{bedlib.SOCKS_PORT}"]
        result = self.bed.netclient(args, timeout=self.time_left(110))
        if "ok" not in result:
            raise ValueError(str(result))
        return {
            "ok": result["ok"],
            "fail": result["fail"],
            "req_per_s": result["rate_per_s"],
            "p50_ms": result["lat_ms"]["p50"],
            "p99_ms": result["lat_ms"]["p99"],
            "errors": result["errors"],
        }

    def run_label(self, label: str) -> dict[str, Metrics]:
        tests: dict[str, Callable[[str], Metrics]] = {
            "latency_n200_c1": lambda lb: self.get_many(lb, n=200, c=1),
            "conn_n200_c200": lambda lb: self.get_many(lb, n=200, c=200),
            "conn_n2000_c100": lambda lb: self.get_many(lb, n=2000, c=100),
            "iperf_up_P1": lambda lb: self.iperf(lb, reverse=False),
            "iperf_down_P1": lambda lb: self.iperf(lb, reverse=True),
        }
        results = {}
        for name, fn in tests.items():
            results[name] = self.measure(label, fn)
            print(f"  {label:13} {name:16} {json.dumps(results[name])}", flush=True)
            time.sleep(0.5)  # let TIME-WAIT and the CPU settle between tests
        return results


def run_tun2socks_label(
    runner: Runner, bed: bedlib.Bed, args: argparse.Namespace
) -> dict[str, Any]:
    log_path = bed.workdir / "tun2socks.log"
    try:
        bed.start_tun2socks(log_path, extra={"log": {"level": args.log_level}})
        probe = bed.run_cli(["curl", "-sS", "--max-time", "5", f"{_url()}/small"], timeout=15)
        if probe.returncode != 0:
            raise bedlib.BedError(f"probe GET through the TUN failed: {probe.stderr.strip()}")
    except (bedlib.BedError, subprocess.TimeoutExpired) as exc:
        bed.stop_tun2socks()
        return {"error": str(exc)[-1500:]}
    try:
        return runner.run_label(LABEL_TUN)
    finally:
        exit_code = bed.stop_tun2socks()
        if exit_code != 0:
            print(f"tun2socks exit code {exit_code}; log: {log_path}", file=sys.stderr)


def _url() -> str:
    return f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"


def git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


ROWS = (
    ("iperf3 upload, 1 stream", "iperf_up_P1", "gbit_s", "Gbit/s", True),
    ("iperf3 download, 1 stream", "iperf_down_P1", "gbit_s", "Gbit/s", True),
    ("GETs, 2000 (100 at a time)", "conn_n2000_c100", "req_per_s", "req/s", True),
    ("GETs, 200 at once", "conn_n200_c200", "req_per_s", "req/s", True),
    ("small GET latency p50", "latency_n200_c1", "p50_ms", "ms", False),
)


def _cell(metrics: Metrics | None, key: str, unit: str) -> str:
    if not metrics:
        return "-"
    if "error" in metrics:
        return "error"
    text = f"{metrics.get(key)} {unit}"
    if metrics.get("fail"):
        text += f", {metrics['fail']} failed"
    if "tun2socks_cpu_pct" in metrics:
        text += f" (CPU {metrics['tun2socks_cpu_pct']:.0f}%)"
    return text


def _ratio(ours: Metrics | None, ceiling: Metrics | None, key: str, higher: bool) -> str:
    try:
        a, b = float((ours or {})[key]), float((ceiling or {})[key])
    except (KeyError, TypeError, ValueError):
        return "-"
    if a <= 0 or b <= 0:
        return "-"
    return f"{100.0 * (a / b if higher else b / a):.0f}%"


def markdown_table(report: dict[str, Any]) -> str:
    labels = report["labels"]
    ours, ceiling = labels.get(LABEL_TUN, {}), labels.get(LABEL_CEILING, {})
    host = report["host"]
    lines = [
        f"Run {report['date']} on {host['cpus']} CPUs, kernel {host['kernel']}, "
        f"Python {host['python']}, commit {report['commit'] or '?'}, "
        f"TUN MTU {report['mtu']}, iperf3 {report['iperf_secs']} s per direction "
        f"(`bench/results/{report['file']}`).",
        "",
        f"| test | {LABEL_TUN} | {LABEL_CEILING} (ceiling) | {LABEL_TUN} / ceiling |",
        "|---|---|---|---|",
    ]
    for title, test, key, unit, higher in ROWS:
        a, b = ours.get(test), ceiling.get(test)
        ratio = _ratio(a, b, key, higher)
        lines.append(f"| {title} | {_cell(a, key, unit)} | {_cell(b, key, unit)} | {ratio} |")
    if "error" in ours:
        lines += ["", f"{LABEL_TUN} did not run: `{str(ours['error']).splitlines()[0][:200]}`"]
    lines.append("")
    lines.append("Latency: ratio is ceiling / ours (higher is better everywhere).")
    return "\n".join(lines)


def update_readme(table: str) -> None:
    text = README.read_text()
    begin, end = text.find(BEGIN_MARK), text.find(END_MARK)
    if begin < 0 or end < begin:
        raise SystemExit(f"{README}: markers {BEGIN_MARK} / {END_MARK} not found")
    README.write_text(text[: begin + len(BEGIN_MARK)] + "\n" + table + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="benchmark tun2socks on a namespace bed"
    )
    parser.add_argument("--mtu", type=int, default=1500, help="TUN MTU (default 1500)")
    parser.add_argument("--labels", default=f"{LABEL_CEILING},{LABEL_TUN}")
    parser.add_argument("--iperf-secs", type=int, default=5)
    parser.add_argument("--log-level", default="warning", help="tun2socks log level")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md")
    args = parser.parse_args(argv)

    missing = bedlib.missing_requirements(iperf=True, proxychains=True)
    if missing:
        print("bench needs: " + ", ".join(missing), file=sys.stderr)
        return 2
    now = datetime.datetime.now(datetime.UTC)
    stamp = now.strftime("%Y-%m-%dT%H%M%SZ")
    report: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "file": f"{stamp}.json",
        "commit": git_commit(),
        "mtu": args.mtu,
        "iperf_secs": args.iperf_secs,
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "labels": {},
    }
    workdir = REPO / "test-artifacts" / f"bench-{stamp}"
    deadline = time.monotonic() + TOTAL_BUDGET_S
    with bedlib.Bed(workdir, mtu=args.mtu, iperf=True) as bed:
        runner = Runner(bed, args, deadline)
        for label in args.labels.split(","):
            print(f"== {label}", flush=True)
            if label == LABEL_CEILING:
                report["labels"][label] = runner.run_label(label)
            elif label == LABEL_TUN:
                report["labels"][label] = run_tun2socks_label(runner, bed, args)
            else:
                parser.error(f"unknown label {label}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / report["file"]).write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    print(table)
    if not args.no_readme:
        update_readme(table)
    print(f"results: {RESULTS_DIR / report['file']}; bed logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
