"""The benchmark's pure parts: verdicts against the issue's targets, the profile summary, and
the README sections (`python -m bench` itself needs root and runs outside the test suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import profile, report, targets
from bench.rows import LABEL_CEILING, LABEL_TUN


def _iperf(gbit_s: float, cpu_s_per_gb: float | None = None) -> dict[str, Any]:
    metrics: dict[str, Any] = {"gbit_s": gbit_s, "bytes": int(gbit_s * 1e9)}
    if cpu_s_per_gb is not None:
        metrics["cpu_s_per_gb"] = cpu_s_per_gb
    return metrics


def _churn(fail: int, slow: int) -> dict[str, Any]:
    return {
        "fail": fail,
        "slow": slow,
        "connections": 6000,
        "req_per_s": 700.0,
        "max_ms": 900.0,
    }


def _results() -> dict[str, dict[str, Any]]:
    """A run that meets every target."""
    return {
        LABEL_CEILING: {
            "up_P1": _iperf(10.0),
            "down_P1": _iperf(10.0),
            "up_P4": _iperf(12.0),
            "down_P4": _iperf(11.0),
            "rate_c200": {"req_per_s": 600.0, "fail": 0},
            "churn_n2000_c100": _churn(0, 0),
            "latency_c1": {"p50_ms": 2.0, "fail": 0},
        },
        LABEL_TUN: {
            "up_P1": _iperf(3.0, 1.5),
            "down_P1": _iperf(2.0, 2.5),
            "up_P4": _iperf(3.1, 1.4),
            "down_P4": _iperf(2.0, 2.4),
            "rate_c200": {"req_per_s": 500.0, "fail": 0},
            "churn_n2000_c100": _churn(0, 0),
            "latency_c1": {"p50_ms": 2.2, "fail": 0},
            "memory": {
                "n": 10_000,
                "opened": 10_000,
                "lost_while_idle": 0,
                "rss_idle_bytes": 50_000_000,
                "rss_after_bytes": 90_000_000,
                "per_conn_bytes": 4000,
            },
        },
    }


def _by_key(results: dict[str, dict[str, Any]]) -> dict[str, targets.Verdict]:
    return {v.measurement: v for v in targets.evaluate(results)}


def test_every_target_row_met() -> None:
    verdicts = _by_key(_results())
    assert {k for k, v in verdicts.items() if v.met is not True} == {"cpu_up", "cpu_down"}
    assert verdicts["up_P1"].ratio == "30%"
    assert verdicts["latency_c1"].ratio == "1.10x"
    assert "1.50 s/GB (1 stream)" in verdicts["cpu_up"].ours


@pytest.mark.parametrize(
    ("label", "key", "metrics", "missed"),
    [
        (LABEL_TUN, "up_P1", _iperf(1.9), "up_P1"),  # 19% < 20%
        (LABEL_TUN, "down_P1", _iperf(1.4), "down_P1"),  # 14% < 15%
        (LABEL_TUN, "up_P4", _iperf(2.9), "up_P4"),  # lower than 1 stream (3.0)
        (LABEL_TUN, "rate_c200", {"req_per_s": 470.0, "fail": 0}, "rate_c200"),
        (LABEL_TUN, "churn_n2000_c100", _churn(0, 1), "churn_n2000_c100"),
        (LABEL_TUN, "churn_n2000_c100", _churn(1, 0), "churn_n2000_c100"),
        (LABEL_CEILING, "latency_c1", {"p50_ms": 1.9, "fail": 0}, "latency_c1"),  # 1.16x
    ],
)
def test_each_target_can_be_missed(label: str, key: str, metrics: Any, missed: str) -> None:
    results = _results()
    results[label][key] = metrics
    verdicts = _by_key(results)
    assert verdicts[missed].met is False
    assert sum(v.met is False for v in verdicts.values()) == 1


def test_memory_targets() -> None:
    results = _results()
    results[LABEL_TUN]["memory"].update(rss_idle_bytes=61_000_000, per_conn_bytes=16 * 1024)
    verdicts = _by_key(results)
    assert verdicts["memory_idle"].met is False
    assert verdicts["memory_per_conn"].met is False


def test_memory_per_connection_needs_every_connection_held() -> None:
    results = _results()
    results[LABEL_TUN]["memory"].update(opened=9_000)
    assert _by_key(results)["memory_per_conn"].met is False
    results[LABEL_TUN]["memory"].update(opened=10_000, lost_while_idle=3)
    assert _by_key(results)["memory_per_conn"].met is False


def test_errors_and_missing_rows_have_no_verdict() -> None:
    results = _results()
    results[LABEL_TUN]["up_P1"] = {"error": "ValueError: iperf3 rc 1"}
    del results[LABEL_TUN]["memory"]
    verdicts = _by_key(results)
    assert verdicts["up_P1"].met is None
    assert verdicts["up_P1"].ours.startswith("error: ValueError")
    assert verdicts["up_P4"].met is None  # its target needs the 1-stream figure
    assert verdicts["memory_idle"].met is None


def test_profile_summary_inclusive_self_and_trunk() -> None:
    raw = "\n".join(
        [
            "<module> (t.py:1);main (t.py:3);a (t.py:10);b (t.py:20) 6",
            "<module> (t.py:1);main (t.py:3);a (t.py:10) 2",
            "<module> (t.py:1);main (t.py:3);c (t.py:30);c (t.py:30) 2",  # recursion
        ]
    )
    summary = profile.summarize(raw)
    assert summary["samples"] == 10
    assert summary["trunk"] == ["<module> (t.py)", "main (t.py)"]
    shares = {row["function"]: (row["inclusive"], row["self"]) for row in summary["top"]}
    assert shares == {"a (t.py)": (0.8, 0.2), "b (t.py)": (0.6, 0.6), "c (t.py)": (0.2, 0.2)}


def test_variant_of() -> None:
    assert report.variant_of(None, True) == report.VARIANT_DEFAULTS
    assert report.variant_of(1500, False) == report.VARIANT_PLAIN
    assert report.variant_of(9000, True) is None
    assert report.variant_of(None, False) is None


def test_replace_section_touches_only_its_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- bench:defaults:begin -->\nold\n<!-- bench:defaults:end -->\n"
        "<!-- bench:profile:begin -->\nkeep\n<!-- bench:profile:end -->\n"
    )
    report.replace_section("defaults", "new | table", readme)
    text = readme.read_text()
    assert "new | table" in text and "old" not in text and "keep" in text
    with pytest.raises(SystemExit):
        report.replace_section("mtu1500-no-offload", "x", readme)
