"""The issue's target table, and the verdict of one run against it.

Ratios are to the `socks-danted` ceiling measured in the same run (same bed, same sitting); the
memory and churn targets are absolute. A verdict is met (True), not met (False), or None when
the row only reports (CPU) or could not be measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .rows import LABEL_CEILING, LABEL_TUN

Metrics = dict[str, Any]

UPLOAD_MIN_RATIO = 0.20
DOWNLOAD_MIN_RATIO = 0.15
RATE_MIN_RATIO = 0.80
LATENCY_MAX_RATIO = 1.15
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
    return f"{m['p50_ms']:.2f} ms" + (f", {m['fail']} failed" if m.get("fail") else "")


def evaluate(results: dict[str, dict[str, Metrics]]) -> list[Verdict]:
    """One verdict per row of the issue's table (rows not measured come out as '-')."""
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

    ratio_row("iperf3 upload, 1 stream", "up_P1", _gbit, "gbit_s", UPLOAD_MIN_RATIO)
    ratio_row("iperf3 download, 1 stream", "down_P1", _gbit, "gbit_s", DOWNLOAD_MIN_RATIO)
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
    ratio_row("connection rate, 200 at once", "rate_c200", _rate, "req_per_s", RATE_MIN_RATIO)

    key = "churn_n2000_c100"
    ours = _get(results, LABEL_TUN, key)
    verdicts.append(
        Verdict(
            "2,000 short connections, 100 at a time, 3 runs",
            key,
            _cell(results, LABEL_TUN, key, _churn),
            _cell(results, LABEL_CEILING, key, _churn),
            "-",
            "0 failed, 0 over 5 s",
            (ours["fail"] == 0 and ours["slow"] == 0) if ours else None,
            (1.0 if ours["fail"] == 0 and ours["slow"] == 0 else 0.0) if ours else None,
        )
    )

    key = "latency_c1"
    ours, ceiling = _get(results, LABEL_TUN, key), _get(results, LABEL_CEILING, key)
    ratio, met, score = "-", None, None
    if ours and ceiling and ceiling["p50_ms"] > 0:
        times = ours["p50_ms"] / ceiling["p50_ms"]
        ratio, met, score = f"{times:.2f}x", times <= LATENCY_MAX_RATIO, LATENCY_MAX_RATIO / times
    verdicts.append(
        Verdict(
            "small GET latency p50",
            key,
            _cell(results, LABEL_TUN, key, _latency),
            _cell(results, LABEL_CEILING, key, _latency),
            ratio,
            f"<= {LATENCY_MAX_RATIO:.2f}x the ceiling",
            met,
            score,
        )
    )
    verdicts += _memory_verdicts(_get(results, LABEL_TUN, "memory"), results)
    verdicts += _cpu_verdicts(results)
    return verdicts


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
