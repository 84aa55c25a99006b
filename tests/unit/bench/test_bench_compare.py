"""`python3 -m bench --against REV`: pairing, ratios and the verdict (bench/compare.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import compare
from bench.compare import SIDE_AFTER, SIDE_BEFORE, Pair, PairedRunner


def test_each_side_goes_first_in_half_of_the_pairs_of_every_measurement() -> None:
    for measurement in range(7):
        firsts = [compare.pair_order(r, measurement)[0] for r in range(6)]
        assert firsts.count(SIDE_BEFORE) == firsts.count(SIDE_AFTER) == 3
    # neighbouring measurements of one round start with different sides: no side always
    # measures right after a restart of the same kind
    assert compare.pair_order(0, 0) != compare.pair_order(0, 1)


def test_ratio_is_below_one_when_after_is_worse_for_rates_and_for_latency() -> None:
    slower_rate = Pair({"req_per_s": 500.0}, {"req_per_s": 450.0})
    assert slower_rate.ratio("churn_n2000_c100") == pytest.approx(0.9)
    slower_latency = Pair({"p50_ms": 2.0}, {"p50_ms": 2.5})
    assert slower_latency.ratio("latency_c1") == pytest.approx(0.8)


def test_a_failed_side_gives_no_ratio() -> None:
    assert Pair({"error": "tun2socks exited"}, {"gbit_s": 3.0}).ratio("down_P1") is None
    assert Pair({"gbit_s": 3.0, "error": "x"}, {"gbit_s": 3.0}).ratio("down_P1") is None
    assert Pair({"gbit_s": 0.0}, {"gbit_s": 3.0}).ratio("down_P1") is None


def test_summary_takes_the_median_of_the_pairs_ratios_not_the_ratio_of_medians() -> None:
    pairs = [
        Pair({"gbit_s": 2.0, "tun2socks_cpu_s": 8.0}, {"gbit_s": 2.0, "tun2socks_cpu_s": 7.0}),
        Pair({"gbit_s": 4.0, "tun2socks_cpu_s": 8.0}, {"gbit_s": 3.0, "tun2socks_cpu_s": 8.0}),
        Pair({"gbit_s": 3.0, "tun2socks_cpu_s": 8.0}, {"gbit_s": 3.3, "tun2socks_cpu_s": 9.0}),
        Pair({"error": "budget"}, {"gbit_s": 3.0}),
    ]
    s = compare.summarize("down_P1", pairs)
    assert s.ratios == [1.0, 0.75, 1.1]
    assert s.ratio == pytest.approx(1.0)
    assert (s.before, s.after) == (3.0, 3.0)
    assert (s.cpu_before, s.cpu_after) == (8.0, 8.0)
    assert s.failed_pairs == 1
    assert s.holds is True


def test_a_measurement_worse_by_more_than_five_percent_does_not_hold() -> None:
    pairs = [Pair({"req_per_s": 100.0}, {"req_per_s": v}) for v in (94.0, 94.5, 99.0)]
    assert compare.summarize("rate_c200", pairs).holds is False
    pairs = [Pair({"req_per_s": 100.0}, {"req_per_s": v}) for v in (95.0, 96.0, 90.0)]
    assert compare.summarize("rate_c200", pairs).holds is True


def test_markdown_names_both_commits_and_each_verdict() -> None:
    run = {
        "date": "2026-12-03 07:00 UTC",
        "host": {"cpus": 2, "kernel": "6.18"},
        "against": "dbda8f1",
        "before_commit": "dbda8f1",
        "commit": "abc1234",
        "rounds": 2,
        "mtu": 1500,
        "offload": True,
        "iperf_secs": 8,
        "load_avg_start": (0.5, 0.4, 0.3),
        "file": "x-against.json",
    }
    good = compare.summarize("up_P1", [Pair({"gbit_s": 5.0}, {"gbit_s": 5.1})] * 2)
    bad = compare.summarize("seq_n500_c1", [Pair({"req_per_s": 400.0}, {"req_per_s": 300.0})])
    table = compare.markdown(run, [good, bad])
    assert "before = `dbda8f1` (dbda8f1), after = abc1234" in table
    assert "| up_P1 | 5.00 Gbit/s | 5.10 Gbit/s | 1.020 | 1.02, 1.02 | - | **yes** |" in table
    assert "| seq_n500_c1 | 400 req/s | 300 req/s | 0.750 | 0.75 | - | **no** |" in table
    assert "1 of 2 measurements within 5% of before" in table


def test_paired_runner_restarts_tun2socks_for_every_side_and_alternates_the_order() -> None:
    trees = {SIDE_BEFORE: Path("/before"), SIDE_AFTER: Path("/after")}
    log: list[str] = []
    running: list[Path] = []

    def start(tree: Path) -> str | None:
        log.append(f"start {tree.name}")
        running.append(tree)
        return None

    def measure(name: str) -> dict[str, float]:
        log.append(f"measure {name}")
        return {"gbit_s": 2.0 if running[-1].name == "before" else 3.0}

    def stop() -> None:
        log.append("stop")

    pairs = PairedRunner(trees, start, measure, stop, settle_s=0.0).run(["iperf1"], rounds=2)
    assert [p.ratio("up_P1") for p in pairs["up_P1"]] == [1.5, 1.5]
    assert [p.ratio("down_P1") for p in pairs["down_P1"]] == [1.5, 1.5]
    starts = [line for line in log if line.startswith("start")]
    assert starts == [
        "start before", "start after",  # round 1, up_P1
        "start after", "start before",  # round 1, down_P1
        "start after", "start before",  # round 2, up_P1
        "start before", "start after",  # round 2, down_P1
    ]  # fmt: skip
    assert log.count("stop") == 8


def test_a_side_that_does_not_start_is_an_error_not_a_measurement() -> None:
    trees = {SIDE_BEFORE: Path("/before"), SIDE_AFTER: Path("/after")}
    runner = PairedRunner(
        trees,
        start=lambda tree: "exited with 1" if tree.name == "before" else None,
        measure=lambda name: {"req_per_s": 100.0},
        stop=lambda: None,
        settle_s=0.0,
    )
    (pair,) = runner.run(["rate"], rounds=1)["rate_c200"]
    assert pair.before == {"error": "exited with 1"}
    assert pair.ratio("rate_c200") is None


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_export_tree_writes_the_revisions_code_only(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "tun2socks").mkdir(parents=True)
    (repo / "dns" / "tun2socks_dns").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "tun2socks" / "engine.py").write_text("OLD = 1\n")
    (repo / "dns" / "tun2socks_dns" / "cache.py").write_text("CACHE = 1\n")
    (repo / "tests" / "test_x.py").write_text("")
    _git(repo.parent, "init", "-q", str(repo))
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    first = _git(repo, "rev-parse", "--short", "HEAD")
    (repo / "tun2socks" / "engine.py").write_text("NEW = 1\n")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two")

    dest = tmp_path / "before"
    assert compare.export_tree(repo, "HEAD~1", dest) == first
    assert (dest / "tun2socks" / "engine.py").read_text() == "OLD = 1\n"
    assert (dest / "dns" / "tun2socks_dns" / "cache.py").exists()
    assert not (dest / "tests").exists()
    with pytest.raises(SystemExit, match="--against nosuchrev"):
        compare.export_tree(repo, "nosuchrev", tmp_path / "none")
