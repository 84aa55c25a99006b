"""`python3 -m bench --against REV`: this tree's tun2socks against revision REV's, in pairs.

This host's own speed moves by 30-50% between sittings (bench/README.md), more than any change
worth measuring, so ratios to a ceiling measured minutes apart cannot settle "no row worse by
more than 5%". Here the two sides are measured as pairs instead: for each measurement and round,
one side right after the other, each on a freshly started tun2socks, alternating which goes
first (ABBA over the rounds) so that a drifting host favours neither. A pair's ratio compares
two runs seconds apart; the verdict per measurement is the median of its pairs' ratios.

REV's `tun2socks/` and `dns/` are exported with `git archive` into the bed's folder and run
with the same bed, clients and settings as this tree; only the code differs.
"""

from __future__ import annotations

import statistics
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from .rows import MEASUREMENTS, Metrics

SIDE_BEFORE = "before"
SIDE_AFTER = "after"
TOLERANCE = 0.05  # a measurement "holds" when its median ratio is at least 1 - TOLERANCE
DEFAULT_ROWS = ("seq", "rate", "churn", "iperf1", "iperf4")  # the rates and the throughputs
COMPARABLE_ROWS = ("latency", *DEFAULT_ROWS)  # "remote" needs the relay; "memory" is no rate

# measurement -> (its headline metric, whether higher is better)
HEADLINE: dict[str, tuple[str, bool]] = {
    "latency_c1": ("p50_ms", False),
    "seq_n500_c1": ("req_per_s", True),
    "rate_c200": ("req_per_s", True),
    "churn_n2000_c100": ("req_per_s", True),
    "up_P1": ("gbit_s", True),
    "down_P1": ("gbit_s", True),
    "up_P4": ("gbit_s", True),
    "down_P4": ("gbit_s", True),
}
UNIT = {"p50_ms": "ms", "req_per_s": "req/s", "gbit_s": "Gbit/s"}


def export_tree(repo: Path, rev: str, dest: Path) -> str:
    """Write REV's `tun2socks/` and `dns/` under `dest`; REV's short commit id."""

    def git(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, check=True, timeout=60
        ).stdout

    try:
        commit = git("rev-parse", "--short", f"{rev}^{{commit}}").decode().strip()
        archive = git("archive", "--format=tar", commit, "tun2socks", "dns")
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--against {rev}: {exc.stderr.decode().strip()}") from exc
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return commit


def pair_order(round_index: int, measurement_index: int) -> tuple[str, str]:
    """Which side goes first: alternating over the measurements and over the rounds, so each
    side goes first in half of the pairs of every measurement (ABBA)."""
    if (round_index + measurement_index) % 2 == 0:
        return SIDE_BEFORE, SIDE_AFTER
    return SIDE_AFTER, SIDE_BEFORE


@dataclass(frozen=True)
class Pair:
    before: Metrics
    after: Metrics

    def ratio(self, measurement: str) -> float | None:
        """How the after side did against the before side, oriented so that below 1 is worse
        (after/before for rates, before/after for latencies); None if either side failed."""
        key, higher_is_better = HEADLINE[measurement]
        b, a = self.before.get(key), self.after.get(key)
        if not b or not a or "error" in self.before or "error" in self.after:
            return None
        return float(a / b if higher_is_better else b / a)


@dataclass(frozen=True)
class Summary:
    measurement: str
    before: float | None  # median headline over the rounds
    after: float | None
    ratio: float | None  # median of the pairs' ratios
    ratios: list[float]
    cpu_before: float | None  # median tun2socks CPU-seconds per measurement
    cpu_after: float | None
    failed_pairs: int

    @property
    def holds(self) -> bool | None:
        return None if self.ratio is None else self.ratio >= 1.0 - TOLERANCE


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(measurement: str, pairs: list[Pair]) -> Summary:
    key, _ = HEADLINE[measurement]

    def side(pick: Callable[[Pair], Metrics], metric: str) -> list[float]:
        return [float(pick(p)[metric]) for p in pairs if pick(p).get(metric) is not None]

    ratios = [r for r in (p.ratio(measurement) for p in pairs) if r is not None]
    return Summary(
        measurement,
        _median(side(lambda p: p.before, key)),
        _median(side(lambda p: p.after, key)),
        _median(ratios),
        [round(r, 3) for r in ratios],
        _median(side(lambda p: p.before, "tun2socks_cpu_s")),
        _median(side(lambda p: p.after, "tun2socks_cpu_s")),
        len(pairs) - len(ratios),
    )


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def markdown(run: dict[str, Any], summaries: list[Summary]) -> str:
    lines = [
        f"Run {run['date']} on {run['host']['cpus']} CPUs, kernel {run['host']['kernel']}: "
        f"before = `{run['against']}` ({run['before_commit']}), after = {run['commit']}; "
        f"{run['rounds']} pairs per measurement, each pair one side right after the other on a "
        f"fresh tun2socks, first side alternating; TUN MTU {run['mtu']}, offloads "
        f"{'on' if run['offload'] else 'off'}; iperf3 {run['iperf_secs']} s per test; load "
        f"average at start {run['load_avg_start'][0]:.2f}; raw results "
        f"`bench/results/{run['file']}`.",
        "",
        "| measurement | before (median) | after (median) | after / before, median of pairs "
        "| each pair | CPU s, before / after | within 5% |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        unit = UNIT[HEADLINE[s.measurement][0]]
        verdict = {True: "**yes**", False: "**no**", None: "-"}[s.holds]
        cpu = "-"
        if s.cpu_before is not None and s.cpu_after is not None:
            cpu = f"{s.cpu_before:.2f} / {s.cpu_after:.2f}"
        each = ", ".join(f"{r:.2f}" for r in s.ratios)
        if s.failed_pairs:
            each += f" ({s.failed_pairs} failed)"
        ratio = "-" if s.ratio is None else f"{s.ratio:.3f}"
        cells = (
            s.measurement,
            _number(s.before, unit),
            _number(s.after, unit),
            ratio,
            each,
            cpu,
            verdict,
        )
        lines.append("| " + " | ".join(cells) + " |")
    held = [s.holds for s in summaries if s.holds is not None]
    lines += [
        "",
        f"{sum(held)} of {len(held)} measurements within 5% of before. A ratio is oriented so "
        "that below 1 is worse (after / before for rates, before / after for latency).",
    ]
    return "\n".join(lines)


class PairedRunner:
    """Measures each selected measurement `rounds` times for both sides, pair by pair.

    `start(tree)` starts a fresh tun2socks of that tree (an error text, or None); `measure(name)`
    takes one measurement of the running tun2socks; `stop()` stops it."""

    def __init__(
        self,
        trees: dict[str, Path],
        start: Callable[[Path], str | None],
        measure: Callable[[str], Metrics],
        stop: Callable[[], None],
        settle_s: float,
    ) -> None:
        self.trees = trees
        self.start = start
        self.measure = measure
        self.stop = stop
        self.settle_s = settle_s

    def one_side(self, side: str, name: str) -> Metrics:
        error = self.start(self.trees[side])
        if error:
            return {"error": error}
        try:
            return self.measure(name)
        finally:
            self.stop()
            time.sleep(self.settle_s)

    def run(self, rows: list[str], rounds: int) -> dict[str, list[Pair]]:
        names = [n for row in rows for n in MEASUREMENTS[row]]
        pairs: dict[str, list[Pair]] = {n: [] for n in names}
        for r in range(rounds):
            for i, name in enumerate(names):
                got = {side: self.one_side(side, name) for side in pair_order(r, i)}
                pair = Pair(got[SIDE_BEFORE], got[SIDE_AFTER])
                pairs[name].append(pair)
                ratio = pair.ratio(name)
                shown = "failed" if ratio is None else f"{ratio:.3f}"
                print(f"  round {r + 1}/{rounds} {name:17} after/before {shown}", flush=True)
        return pairs


def as_json(pairs: dict[str, list[Pair]]) -> dict[str, Any]:
    return {
        name: [{SIDE_BEFORE: p.before, SIDE_AFTER: p.after} for p in ps]
        for name, ps in pairs.items()
    }
