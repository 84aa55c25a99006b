"""`--profile`: where tun2socks spends its time during a bulk upload, a bulk download, and
new connections one after the other (the sequential row's workload: the connection path).

py-spy samples the running tun2socks process from outside (`py-spy record -p PID -f raw
--function`, 100 samples/s, idle samples left out) while iperf3 moves data through the TUN. For the
connection path `netclient.py get-many -c 1` makes GETs one after the other. The raw output is
collapsed stacks, one line per distinct stack: `frame;frame;...;leaf COUNT`. From
it: each function's inclusive share (samples with the function anywhere on the stack) and self
share (samples with it as the leaf), as fractions of all samples. The raw files are kept next to
the JSON (speedscope.app opens them as they are).

py-spy pauses the process for each sample, so throughput under the profiler is a bit lower
than in the table; it is reported only to show that the profile saw a loaded process. Time in
a system call (the kernel carrying a packet through the veth or the TUN to its receiver, in
our process's context) counts as self time of the Python function that made it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.integration import bed as bedlib

from .rows import LABEL_TUN, Runner

PROFILE_SECS = 5
WARMUP_S = 1.5  # let slow start end before sampling
TOP_N = 20
CONNECTIONS = 4000  # more than PROFILE_SECS + WARMUP_S take one after the other
_FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy") or (
        str(p) if (p := Path(sys.executable).with_name("py-spy")).exists() else None
    )


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/lib/python3.12/", "/lib/python3.13/"):
        if marker in path:
            return path.split(marker, 1)[1]
    repo = str(Path(__file__).resolve().parent.parent) + "/"
    return path.removeprefix(repo)


def _frame_name(frame: str) -> str:
    match = _FRAME_RE.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match['func']} ({_short_path(match['file'])})"


def summarize(raw: str, top: int = TOP_N) -> dict[str, Any]:
    """Inclusive and self shares per function from py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        total += count
        leaf[frames[-1]] += count
        for name in set(frames):  # recursion counts once
            inclusive[name] += count
    # the trunk (start-up frames down to the event loop, on every stack and never a leaf) says
    # nothing about where the time goes: named once, left out of the ranking
    trunk = sorted(name for name, n in inclusive.items() if n == total and not leaf[name])
    ranked = [(name, n) for name, n in inclusive.most_common() if name not in trunk]
    rows = [
        {
            "function": name,
            "inclusive": round(n / total, 4),
            "self": round(leaf[name] / total, 4),
        }
        for name, n in ranked[:top]
    ]
    by_self = [
        {"function": name, "self": round(n / total, 4)} for name, n in leaf.most_common(top // 2)
    ]
    return {"samples": total, "trunk": trunk, "top": rows, "top_self": by_self}


def record(runner: Runner, *, reverse: bool, out_path: Path) -> dict[str, Any]:
    """Profile tun2socks for PROFILE_SECS during one bulk iperf3 transfer through the TUN."""
    secs = int(PROFILE_SECS + WARMUP_S + 2)
    cmd = runner.iperf_command(LABEL_TUN, reverse=reverse, streams=1, secs=secs)
    summary, out, _ = profile_under_load(runner, cmd, secs, out_path)
    if "error" in summary:
        return summary
    try:
        summary["gbit_s_under_profiler"] = round(
            json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9, 3
        )
    except (json.JSONDecodeError, KeyError, TypeError):
        summary["iperf_error"] = out[-300:]
    return summary


def record_connections(runner: Runner, *, out_path: Path) -> dict[str, Any]:
    """Profile tun2socks for PROFILE_SECS while new connections are made one after the other
    (each a GET of /small that the server closes)."""
    secs = PROFILE_SECS + WARMUP_S + 2
    args = ["get-many", "--host", bedlib.TARGET_IP, "--path", "/small", "-n", str(CONNECTIONS)]
    args += ["-c", "1", "--req-timeout", "15", "--total-timeout", str(int(secs))]
    load = [sys.executable, str(bedlib.NET_CLIENT_SCRIPT), *args]
    summary, out, cpu = profile_under_load(runner, load, secs, out_path)
    if "error" in summary:
        return summary
    try:
        result = json.loads(out)
        summary["req_per_s_under_profiler"] = result["rate_per_s"]
        # The client ran on past the profile (the total timeout ends it): its rate stands
        # for the profiled seconds as well.
        summary["cpu_ms_per_connection"] = round(
            1000 * cpu / (result["rate_per_s"] * PROFILE_SECS), 3
        )
    except (json.JSONDecodeError, KeyError, TypeError, ZeroDivisionError):
        summary["client_error"] = out[-300:]
    return summary


def profile_under_load(
    runner: Runner, load: list[str], secs: float, out_path: Path
) -> tuple[dict[str, Any], str, float]:
    """Run `load` (a command of `secs` seconds) in the client namespace and, after WARMUP_S,
    py-spy on tun2socks for PROFILE_SECS into `out_path`. Returns the profile's summary (or
    {"error": ...}), the load's output, and the CPU seconds tun2socks used while profiled."""
    t2s = runner.bed.tun2socks
    spy = py_spy()
    if spy is None:
        return {"error": "py-spy not found (pip install -e '.[bench]')"}, "", 0.0
    if t2s is None or t2s.process.poll() is not None:
        return {"error": "tun2socks is not running"}, "", 0.0
    process = subprocess.Popen(
        [*runner.bed.cli_prefix(), *load],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(WARMUP_S)
        cpu_before = bedlib.process_cpu_seconds(t2s.pid)
        spy_cmd = [spy, "record", "-p", str(t2s.pid), "-d", str(PROFILE_SECS), "-f", "raw"]
        spy_cmd += ["--function", "-o", str(out_path)]
        spied = bedlib.run(spy_cmd, timeout=runner.time_left(PROFILE_SECS + 30), check=False)
        cpu = bedlib.process_cpu_seconds(t2s.pid) - cpu_before
        out, _ = process.communicate(timeout=runner.time_left(secs + 30))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    if spied.returncode != 0 or not out_path.exists():
        error = f"py-spy exit {spied.returncode}: {spied.stderr.strip()[-300:]}"
        return {"error": error}, out, cpu
    summary = summarize(out_path.read_text())
    summary["raw_file"] = out_path.name
    return summary, out, cpu


def markdown(profiles: dict[str, dict[str, Any]], context: str) -> str:
    lines = [
        f"Recorded {context} with `py-spy record --function` ({PROFILE_SECS} s at 100 Hz; "
        "samples py-spy judges idle are left out, so a share of `select` means waiting it did "
        "not recognise) during one bulk iperf3 transfer each way through the TUN, and while "
        "new connections are made one after the other (`connections`). Inclusive: "
        "share of samples with the function anywhere on the stack; self: as the innermost frame.",
    ]
    for direction, profile in profiles.items():
        lines += ["", f"**{direction}**"]
        if "error" in profile:
            lines += ["", f"not recorded: `{profile['error'][:200]}`"]
            continue
        if "req_per_s_under_profiler" in profile:
            under = (
                f"{profile['req_per_s_under_profiler']} connections/s under the profiler, "
                f"{profile.get('cpu_ms_per_connection', '?')} ms of tun2socks CPU each"
            )
        else:
            under = f"iperf3 under the profiler {profile.get('gbit_s_under_profiler', '?')} Gbit/s"
        lines += [
            "",
            f"{profile['samples']} samples; {under}; raw stacks "
            f"`bench/results/{profile['raw_file']}`. Left out, on every stack and never the "
            f"innermost: {', '.join(f'`{t}`' for t in profile.get('trunk', [])) or 'nothing'}.",
            "",
            "| # | function (file) | inclusive | self |",
            "|---|---|---|---|",
        ]
        for i, row in enumerate(profile["top"], 1):
            name = row["function"].replace("|", "\\|")  # <module> is fine inside a code span
            lines.append(
                f"| {i} | `{name}` | {100 * row['inclusive']:.1f}% | {100 * row['self']:.1f}% |"
            )
        if profile.get("top_self"):
            shares = ", ".join(
                f"`{row['function']}` {100 * row['self']:.1f}%" for row in profile["top_self"]
            )
            lines += ["", f"The most self time: {shares}."]
    return "\n".join(lines)
