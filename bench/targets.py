"""The target tables (issue 14 for connections and throughput, issue 7 for memory), and the
verdict of one run against them.

Ratios are to the `socks-danted` ceiling measured in the same run (same bed, same sitting); the
memory targets are absolute. A verdict is met (True), not met (False), or None when the row only
reports (CPU) or could not be measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .rows import LABEL_CEILING, LABEL_TUN

Metrics = dict[str, Any]

# issue 14: 1 stream no lower than the ratios of its filing (71% up, 64% down) minus 5 points
UPLOAD_MIN_RATIO = 0.66
DOWNLOAD_MIN_RATIO = 0.59
SEQUENTIAL_MIN_RATIO = 0.90
RATE_MIN_RATIO = 1.00
CHURN_MIN_RATIO = 0.95
LATENCY_MAX_RATIO = 1.15
REMOTE_MAX_RATIO = 0.70
REMOTE_STRETCH_RATIO = 0.40  # the opt-in known-destination mode: the verdict of --early-accept
IDLE_RSS_MAX_BYTES = 60_000_000  # "60 MB"
PER_CONN_MAX_BYTES = 15 * 1024  # "15 KiB"
MEMORY_CONNECTIONS = 10_000


@dataclass(frozen=True)
class Verdict:
    row: str  # the row's title as in the issue
    measurement: str  # key in the results (for the chart and the JSON)
    ours: str
    ceiling: str
    ratio: str  # ours against the ceiling, as the target reads it
    target: str
    met: bool | None
    score: float | None = None  # value / target threshold, for the chart (1.0 = at target)


def _get(results: dict[str, dict[str, Metrics]], label: str, key: str) -> Metrics | None:
    metrics = results.get(label, {}).get(key)
    if not metrics or "error" in metrics:
        return None
    return metrics


def _cell(
    results: dict[str, dict[str, Metrics]], label: str, key: str, fmt: Callable[[Metrics], str]
) -> str:
    metrics = results.get(label, {}).get(key)
    if metrics is None:
        return "-"
    if "error" in metrics:
        return "error: " + str(metrics["error"]).splitlines()[0][:80]
    return fmt(metrics)


def _gbit(m: Metrics) -> str:
    text = f"{m['gbit_s']:.2f} Gbit/s"
    return text + (f" (CPU {m['tun2socks_cpu_pct']:.0f}%)" if "tun2socks_cpu_pct" in m else "")


def _rate(m: Metrics) -> str:
    return f"{m['req_per_s']:.0f} req/s" + (f", {m['fail']} failed" if m.get("fail") else "")


def _churn(m: Metrics) -> str:
    return (
        f"{m['fail']} failed, {m['slow']} over 5 s "
        f"({m['connections']} conns, {m['req_per_s']:.0f} req/s, max {m['max_ms'] / 1000:.1f} s)"
    )


def _latency(m: Metrics) -> str:
    text = f"{m['p50_ms']:.2f} ms"
    if m.get("connect_p50_ms") is not None:
        text += f" (connect {m['connect_p50_ms']:.2f})"
    return text + (f", {m['fail']} failed" if m.get("fail") else "")


def _max_ratio_row(
    results: dict[str, dict[str, Metrics]], row: str, key: str, maximum: float, target: str
) -> Verdict:
    """A latency row: ours / ceiling at most `maximum`."""
    ours, ceiling = _get(results, LABEL_TUN, key), _get(results, LABEL_CEILING, key)
    ratio, met, score = "-", None, None
    if ours and ceiling and ceiling["p50_ms"] > 0:
        times = ours["p50_ms"] / ceiling["p50_ms"]
        ratio, met, score = f"{times:.2f}x", times <= maximum, maximum / times
        met = met and not ours.get("fail")
    return Verdict(
        row,
        key,
        _cell(results, LABEL_TUN, key, _latency),
        _cell(results, LABEL_CEILING, key, _latency),
        ratio,
        target,
        met,
        score,
    )


def evaluate(
    results: dict[str, dict[str, Metrics]], *, early_accept: bool = False
) -> list[Verdict]:
    """One verdict per row of the issue's table (rows not measured come out as '-'). With
    `early_accept` (a run with proxy.early_accept) the 20 ms row is judged by the stretch."""
    verdicts: list[Verdict] = []

    def ratio_row(
        row: str, key: str, fmt: Callable[[Metrics], str], value: str, minimum: float
    ) -> None:
        ours, ceiling = _get(results, LABEL_TUN, key), _get(results, LABEL_CEILING, key)
        ratio, met, score = "-", None, None
        if ours and ceiling and ceiling[value] > 0:
            share = ours[value] / ceiling[value]
            ratio, met, score = f"{100 * share:.0f}%", share >= minimum, share / minimum
        verdicts.append(
            Verdict(
                row,
                key,
                _cell(results, LABEL_TUN, key, fmt),
                _cell(results, LABEL_CEILING, key, fmt),
                ratio,
                f">= {100 * minimum:.0f}% of the ceiling",
                met,
                score,
            )
        )

    verdicts.append(
        _max_ratio_row(
            results,
            "small GET p50, local proxy (time to connect)",
            "latency_c1",
            LATENCY_MAX_RATIO,
            f"<= {LATENCY_MAX_RATIO:.2f}x the ceiling",
        )
    )
    remote_row = "small GET p50, proxy 20 ms away (time to connect)"
    remote_target = f"<= {REMOTE_MAX_RATIO:.2f}x the ceiling (stretch {REMOTE_STRETCH_RATIO:.2f}x)"
    remote_max = REMOTE_MAX_RATIO
    if early_accept:
        remote_row = "the same, stretch: known destination, proxy.early_accept"
        remote_target = f"<= {REMOTE_STRETCH_RATIO:.2f}x the ceiling (opt-in mode)"
        remote_max = REMOTE_STRETCH_RATIO
    verdicts.append(
        _max_ratio_row(results, remote_row, "latency_remote", remote_max, remote_target)
    )
    ratio_row(
        "sequential connections, 500 x 1", "seq_n500_c1", _rate, "req_per_s", SEQUENTIAL_MIN_RATIO
    )
    ratio_row("200 connections at once", "rate_c200", _rate, "req_per_s", RATE_MIN_RATIO)
    verdicts.append(_churn_verdict(results))
    for direction in ("up", "down"):
        key, single = f"{direction}_P4", f"{direction}_P1"
        ours, ours_single = _get(results, LABEL_TUN, key), _get(results, LABEL_TUN, single)
        ceiling = _get(results, LABEL_CEILING, key)
        ratio = f"{100 * ours['gbit_s'] / ceiling['gbit_s']:.0f}%" if ours and ceiling else "-"
        met, score, target = None, None, "no lower than 1 stream"
        if ours and ours_single:
            met = ours["gbit_s"] >= ours_single["gbit_s"]
            score = ours["gbit_s"] / ours_single["gbit_s"] if ours_single["gbit_s"] else None
            target += f" ({ours_single['gbit_s']:.2f})"
        title = f"iperf3 {'upload' if direction == 'up' else 'download'}, 4 streams"
        verdicts.append(
            Verdict(
                title,
                key,
                _cell(results, LABEL_TUN, key, _gbit),
                _cell(results, LABEL_CEILING, key, _gbit),
                ratio,
                target,
                met,
                score,
            )
        )
    ratio_row("iperf3 upload, 1 stream", "up_P1", _gbit, "gbit_s", UPLOAD_MIN_RATIO)
    ratio_row("iperf3 download, 1 stream", "down_P1", _gbit, "gbit_s", DOWNLOAD_MIN_RATIO)
    verdicts += _memory_verdicts(_get(results, LABEL_TUN, "memory"), results)
    verdicts += _cpu_verdicts(results)
    return verdicts


def _churn_verdict(results: dict[str, dict[str, Metrics]]) -> Verdict:
    """2,000 connections, 100 at a time, 3 runs: the ceiling's rate or near it, none failed,
    none over 5 s (issue 7's condition, kept)."""
    key = "churn_n2000_c100"
    ours, ceiling = _get(results, LABEL_TUN, key), _get(results, LABEL_CEILING, key)
    ratio, met, score = "-", None, None
    if ours:
        clean = ours["fail"] == 0 and ours["slow"] == 0
        met, score = clean, 1.0 if clean else 0.0
        if ceiling and ceiling["req_per_s"] > 0:
            share = ours["req_per_s"] / ceiling["req_per_s"]
            ratio = f"{100 * share:.0f}%"
            met = clean and share >= CHURN_MIN_RATIO
            score = share / CHURN_MIN_RATIO if clean else 0.0
    return Verdict(
        "2,000 connections, 100 at a time, 3 runs",
        key,
        _cell(results, LABEL_TUN, key, _churn),
        _cell(results, LABEL_CEILING, key, _churn),
        ratio,
        f">= {100 * CHURN_MIN_RATIO:.0f}% of the ceiling's rate, 0 failed, 0 over 5 s",
        met,
        score,
    )


def _memory_verdicts(mem: Metrics | None, results: dict[str, dict[str, Metrics]]) -> list[Verdict]:
    error = _cell(results, LABEL_TUN, "memory", lambda m: "")
    if mem is None:
        return [
            Verdict(
                "memory: resident set while idle", "memory_idle", error, "-", "-", "< 60 MB", None
            ),
            Verdict(
                "memory: per idle open connection",
                "memory_per_conn",
                error,
                "-",
                "-",
                "< 15 KiB",
                None,
            ),
        ]
    idle = mem["rss_idle_bytes"]
    per_conn = mem["per_conn_bytes"]
    complete = mem["opened"] >= MEMORY_CONNECTIONS and not mem.get("lost_while_idle")
    conn_text = (
        f"{per_conn / 1024:.1f} KiB ({mem['opened']} of {mem['n']} open, "
        f"{mem['lost_while_idle']} lost; RSS {mem['rss_after_bytes'] / 1e6:.0f} MB)"
        if per_conn is not None
        else f"none of {mem['n']} opened: {mem.get('errors')}"
    )
    return [
        Verdict(
            "memory: resident set while idle",
            "memory_idle",
            f"{idle / 1e6:.1f} MB",
            "-",
            "-",
            "< 60 MB",
            idle < IDLE_RSS_MAX_BYTES,
            IDLE_RSS_MAX_BYTES / idle,
        ),
        Verdict(
            f"memory: per idle open connection at {MEMORY_CONNECTIONS:,}",
            "memory_per_conn",
            conn_text,
            "-",
            "-",
            "< 15 KiB",
            (per_conn is not None and per_conn < PER_CONN_MAX_BYTES and complete),
            PER_CONN_MAX_BYTES / per_conn if per_conn and per_conn > 0 else None,
        ),
    ]


def _cpu_verdicts(results: dict[str, dict[str, Metrics]]) -> list[Verdict]:
    verdicts = []
    for direction, title in (("up", "upload"), ("down", "download")):
        parts = []
        for streams in ("P1", "P4"):
            m = _get(results, LABEL_TUN, f"{direction}_{streams}")
            if m and "cpu_s_per_gb" in m:
                count = "1 stream" if streams == "P1" else "4 streams"
                parts.append(f"{m['cpu_s_per_gb']:.2f} s/GB ({count})")
        verdicts.append(
            Verdict(
                f"CPU per GB, {title}",
                f"cpu_{direction}",
                "; ".join(parts) or "-",
                "-",
                "-",
                "report CPU-seconds per GB",
                None,
            )
        )
    return verdicts
