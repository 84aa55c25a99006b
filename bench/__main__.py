"""`sudo python3 -m bench`: measure tun2socks and the socks-danted ceiling back to back.

Builds the integration tests' namespace bed, starts tun2socks in it, and takes each selected
row's measurements for both labels, one after the other (ceiling first), so that both see the
same machine. The memory row runs last on a freshly started tun2socks; `--profile` then samples
it with py-spy. Writes bench/results/<date>.json and a PNG chart, prints the table, and (for a
complete run of the shipped defaults or of `--mtu 1500 --no-offload`) rewrites that table's
section of bench/README.md. `--against REV` measures no ceiling: this tree's tun2socks against
REV's, in pairs (bench/compare.py). Every step is bounded; the bed is removed on exit, even on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.integration import bed as bedlib
from tun2socks.config import TunConfig

from . import chart, compare, memory, profile, report, rows, srvproc, targets, timeline
from .rows import LABEL_CEILING, LABEL_TUN, LABELS, MEASUREMENTS, ROW_IDS, Runner

REPO = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 540.0  # measurements; bed setup and teardown fit in the rest of 10 minutes
COMPARE_BUDGET_PER_ROUND_S = 600.0  # --against: a round of the default rows took 2.3 min
COMPARE_SECTION = "against"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench", description="benchmark tun2socks against the socks-danted ceiling"
    )
    parser.add_argument("--mtu", type=int, help="TUN MTU (default: the shipped default)")
    parser.add_argument(
        "--no-offload", action="store_true", help="run tun2socks with tun.offload: false"
    )
    parser.add_argument(
        "--rows",
        help=f"comma-separated rows to measure, or 'none' (default: all of {','.join(ROW_IDS)};"
        f" with --against: {','.join(compare.DEFAULT_ROWS)})",
    )
    parser.add_argument("--iperf-secs", type=int, default=8, help="seconds per iperf3 test")
    parser.add_argument(
        "--idle-conns", type=int, default=10_000, help="idle connections for the memory row"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy profile of bulk transfers")
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="the time of each step of one connection (pcap of the TUN and of the proxy's side)",
    )
    parser.add_argument(
        "--section",
        help="the bench/README.md section a complete run rewrites (default: its configuration's)",
    )
    parser.add_argument(
        "--early-accept",
        action="store_true",
        help="run tun2socks with proxy.early_accept: true (SYN-ACK at once to known destinations)",
    )
    parser.add_argument("--log-level", default="warning", help="tun2socks log level")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md")
    parser.add_argument(
        "--against",
        metavar="REV",
        help="no ceiling: measure this tree's tun2socks against git revision REV's, in pairs"
        " (bench/compare.py)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="pairs per measurement with --against"
    )
    args = parser.parse_args(argv)
    choices = compare.COMPARABLE_ROWS if args.against else ROW_IDS
    if args.rows is None:
        args.rows = ",".join(compare.DEFAULT_ROWS if args.against else ROW_IDS)
    selected = [] if args.rows == "none" else [r.strip() for r in args.rows.split(",") if r]
    unknown = set(selected) - set(choices)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {','.join(choices)}")
    if args.against and (args.profile or args.timeline or args.rounds < 1):
        parser.error("--against takes --rows and --rounds (at least 1), not --profile/--timeline")
    args.selected = [r for r in ROW_IDS if r in selected]  # always in the table's order
    if args.section and not report.has_section(args.section):
        parser.error(f"bench/README.md has no section {args.section!r} (its markers)")
    return args


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: inherited by danted, tun2socks and the clients,
    which hold one fd (tun2socks and danted: two) per connection of the memory row."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tun2socks_extra(args: argparse.Namespace, proxy_port: int | None = None) -> dict[str, Any]:
    """The bench's settings over the bed's tun2socks config; `proxy_port`: another port of the
    proxy's address (the delaying relay) instead of danted's."""
    extra: dict[str, Any] = {"log": {"level": args.log_level}}
    if args.no_offload:
        extra["tun"] = {"offload": False}
    if proxy_port is not None:
        extra["proxy"] = {"url": f"socks5://{bedlib.SRV_VETH_IP}:{proxy_port}"}
    if args.early_accept:
        extra.setdefault("proxy", {})["early_accept"] = True
    return extra


def start_tun2socks(
    bed: bedlib.Bed,
    args: argparse.Namespace,
    log_name: str,
    proxy_port: int | None = None,
    tree: Path = REPO,
) -> str | None:
    """Start a fresh tun2socks (of `tree`) and send one GET through it; an error text, or None."""
    extra = tun2socks_extra(args, proxy_port)
    url = f"http://{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}/small"
    try:
        bed.start_tun2socks(bed.workdir / log_name, extra=extra, tree=tree)
        probe = bed.run_cli(["curl", "-sS", "--max-time", "5", url], timeout=15)
        if probe.returncode != 0:
            raise bedlib.BedError(f"probe GET through the TUN failed: {probe.stderr.strip()}")
    except (bedlib.BedError, subprocess.TimeoutExpired) as exc:
        bed.stop_tun2socks()
        return str(exc)[-1500:]
    return None


def stop_tun2socks(bed: bedlib.Bed, run: dict[str, Any]) -> None:
    code = bed.stop_tun2socks()
    run.setdefault("tun2socks_exit_codes", []).append(code)


def measure_all(bed: bedlib.Bed, args: argparse.Namespace, run: dict[str, Any]) -> None:
    results: dict[str, dict[str, Any]] = run["labels"]
    runner = Runner(bed, rows.RunnerSettings(args.iperf_secs, time.monotonic() + TOTAL_BUDGET_S))
    local_rows = [r for r in args.selected if r not in rows.TUN_ONLY | rows.REMOTE]
    remote_rows = [r for r in args.selected if r in rows.REMOTE]
    relay = None
    try:
        if local_rows:
            measure_rows(bed, args, run, runner, local_rows, None)
        relay_error = None
        if remote_rows or args.timeline:
            try:
                relay = srvproc.start_delay_relay(bed, rows.RELAY_PORT, rows.RELAY_DELAY_MS)
            except bedlib.BedError as exc:
                relay_error = str(exc)
        if remote_rows and relay_error:
            for label in LABELS:
                results[label]["latency_remote"] = {"error": relay_error}
        elif remote_rows:
            measure_rows(bed, args, run, runner, remote_rows, rows.RELAY_PORT)
        if "memory" in args.selected or args.profile:
            error = start_tun2socks(bed, args, "tun2socks-memory.log")
            if "memory" in args.selected:
                results[LABEL_TUN]["memory"] = (
                    {"error": error}
                    if error
                    else memory.measure_memory(bed, args.idle_conns, runner.time_left)
                )
                print(f"  {LABEL_TUN:13} {'memory':17} {_short(results[LABEL_TUN]['memory'])}")
            if args.profile:
                run["profile"] = record_profiles(bed, runner, run)
            stop_tun2socks(bed, run)
        if args.timeline:
            run["timeline"] = record_timeline(bed, args, runner, None if relay_error else relay)
            print(timeline.markdown(run["timeline"], timeline_context(run)))
    except rows.BudgetExhausted as exc:
        run["budget_exhausted"] = str(exc)
        print(f"stopped early: {exc}", file=sys.stderr)
    finally:
        if bed.tun2socks is not None:
            stop_tun2socks(bed, run)
        if relay is not None:
            srvproc.stop(relay)


def measure_rows(
    bed: bedlib.Bed,
    args: argparse.Namespace,
    run: dict[str, Any],
    runner: Runner,
    selected: list[str],
    proxy_port: int | None,
) -> None:
    """Each measurement of `selected` for the ceiling, then at once for a tun2socks started for
    these rows (its proxy: danted, or the relay on `proxy_port`)."""
    results: dict[str, dict[str, Any]] = run["labels"]
    log_name = "tun2socks.log" if proxy_port is None else f"tun2socks-{proxy_port}.log"
    error = start_tun2socks(bed, args, log_name, proxy_port)
    if error:
        results[LABEL_TUN].setdefault("error", error)
    for row in selected:
        for name in MEASUREMENTS[row]:
            for label in LABELS:
                if label == LABEL_TUN and error:
                    continue
                results[label][name] = runner.measure(name, label)
                print(f"  {label:13} {name:17} {_short(results[label][name])}", flush=True)
                time.sleep(rows.SETTLE_S)
    stop_tun2socks(bed, run)


def record_timeline(
    bed: bedlib.Bed, args: argparse.Namespace, runner: Runner, relay: object
) -> dict[str, Any]:
    try:
        return timeline.record(
            bed,
            lambda port: tun2socks_extra(args, port),
            runner.time_left,
            rows.RELAY_PORT if relay is not None else None,
        )
    except (bedlib.BedError, subprocess.TimeoutExpired, ValueError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def timeline_context(run: dict[str, Any]) -> str:
    return (
        f"{run['date']} at commit {run['commit']}, MTU {run['mtu']}, offloads "
        f"{'on' if run['offload'] else 'off'}, load average at start {run['load_avg_start'][0]:.2f}"
    )


def record_profiles(bed: bedlib.Bed, runner: Runner, run: dict[str, Any]) -> dict[str, Any]:
    profiles = {}
    for direction, reverse in (("upload", False), ("download", True)):
        out = report.RESULTS_DIR / f"{run['stamp']}-profile-{direction}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        profiles[direction] = profile.record(runner, reverse=reverse, out_path=out)
        print(f"  profile {direction}: {profiles[direction].get('samples', profiles[direction])}")
        time.sleep(rows.SETTLE_S)
    out = report.RESULTS_DIR / f"{run['stamp']}-profile-connections.txt"
    profiles["connections"] = profile.record_connections(runner, out_path=out)
    print(
        f"  profile connections: {profiles['connections'].get('samples', profiles['connections'])}"
    )
    return profiles


def _short(metrics: dict[str, Any]) -> str:
    keep = {k: v for k, v in metrics.items() if k not in ("errors", "runs_req_per_s", "bytes")}
    return str(keep)[:240]


def git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = proc.stdout.strip()
    return (commit + ("+dirty" if dirty.stdout.strip() else "")) or None


def publish(run: dict[str, Any], args: argparse.Namespace) -> None:
    verdicts = targets.evaluate(run["labels"], early_accept=bool(run.get("early_accept")))
    run["verdicts"] = [
        {"row": v.row, "measurement": v.measurement, "met": v.met, "ratio": v.ratio}
        for v in verdicts
    ]
    png = report.RESULTS_DIR / f"{run['stamp']}.png"
    title = (
        f"tun2socks vs targets, MTU {run['mtu']}, offloads {'on' if run['offload'] else 'off'}"
        f" ({run['date']})"
    )
    has_chart = chart.render(verdicts, title, png)
    complete = args.selected == list(ROW_IDS) and "budget_exhausted" not in run
    section = args.section or run["variant"]
    publish_to = section if complete and not args.no_readme else None
    chart_ref = None
    if has_chart:
        chart_ref = f"results/{png.name}"
        if publish_to:
            shutil.copyfile(png, report.BENCH_DIR / f"chart-{publish_to}.png")
            chart_ref = f"chart-{publish_to}.png"
    path = report.write_json(run)
    table = report.markdown_table(run, verdicts, chart_ref) if args.selected else ""
    print(table)
    if publish_to:
        report.replace_section(publish_to, table)
        print(f"bench/README.md: section {publish_to} rewritten")
    elif args.selected and not args.no_readme:
        print("bench/README.md unchanged: only complete runs of a published variant go there")
    timeline_section = f"timeline-{section}" if section else None
    if "timeline" in run and timeline_section and not args.no_readme:
        if report.has_section(timeline_section):
            body = timeline.markdown(run["timeline"], timeline_context(run))
            report.replace_section(timeline_section, body)
            print(f"bench/README.md: section {timeline_section} rewritten")
        else:
            print(f"bench/README.md has no section {timeline_section}: timeline not written there")
    if "profile" in run and not args.no_readme:
        context = f"at commit {run['commit']}, MTU {run['mtu']}, offloads " + (
            "on" if run["offload"] else "off"
        )
        report.replace_section("profile", profile.markdown(run["profile"], context))
    print(f"results: {path}")


def measure_against(args: argparse.Namespace, run: dict[str, Any], workdir: Path) -> None:
    """`--against REV`: pairs of this tree and REV, no ceiling (bench/compare.py)."""
    with tempfile.TemporaryDirectory(prefix="bench-against-") as exported:
        before_tree = Path(exported)
        run["against"] = args.against
        run["before_commit"] = compare.export_tree(REPO, args.against, before_tree)
        run["rounds"] = args.rounds
        print(f"bench: {run['commit']} against {args.against} ({run['before_commit']})")
        with bedlib.Bed(workdir, mtu=run["mtu"], iperf=True) as bed:
            budget = COMPARE_BUDGET_PER_ROUND_S * args.rounds
            runner = Runner(bed, rows.RunnerSettings(args.iperf_secs, time.monotonic() + budget))
            paired = compare.PairedRunner(
                {compare.SIDE_BEFORE: before_tree, compare.SIDE_AFTER: REPO},
                start=lambda tree: start_tun2socks(bed, args, "tun2socks.log", tree=tree),
                measure=lambda name: runner.measure(name, LABEL_TUN),
                stop=lambda: stop_tun2socks(bed, run),
                settle_s=rows.SETTLE_S,
            )
            pairs = paired.run(args.selected, args.rounds)  # each side stops its tun2socks
    run["pairs"] = compare.as_json(pairs)
    summaries = [compare.summarize(name, ps) for name, ps in pairs.items()]
    run["summaries"] = [
        {"measurement": s.measurement, "ratio": s.ratio, "holds": s.holds} for s in summaries
    ]
    table = compare.markdown(run, summaries)
    print(table)
    path = report.write_json(run)
    if not args.no_readme:
        report.replace_section(COMPARE_SECTION, table)
        print(f"bench/README.md: section {COMPARE_SECTION} rewritten")
    print(f"results: {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = bedlib.missing_requirements(iperf=True, proxychains=True)
    if missing:
        print("bench needs: " + ", ".join(missing), file=sys.stderr)
        return 2
    raise_fd_limit()
    now = datetime.datetime.now(datetime.UTC)
    stamp = now.strftime("%Y-%m-%dT%H%M%SZ")
    mtu = args.mtu if args.mtu is not None else TunConfig().mtu
    offload = not args.no_offload
    run: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "stamp": stamp,
        "file": f"{stamp}.json",
        "commit": git_commit(),
        # Not the shipped defaults with early_accept: printed and saved, never published.
        "variant": None if args.early_accept else report.variant_of(args.mtu, offload),
        "early_accept": args.early_accept,
        "mtu": mtu,
        "offload": offload,
        "rows": args.selected,
        "iperf_secs": args.iperf_secs,
        "idle_conns": args.idle_conns,
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "load_avg_start": os.getloadavg(),
        "labels": {LABEL_CEILING: {}, LABEL_TUN: {}},
    }
    started = time.monotonic()
    workdir = REPO / "test-artifacts" / f"bench-{stamp}"
    if args.against:
        run["file"] = f"{stamp}-against.json"
        measure_against(args, run, workdir)
        print(f"bed logs: {workdir}; {round(time.monotonic() - started, 1)} s")
        return 0
    print(f"bench: rows {','.join(args.selected) or 'none'}, MTU {mtu}, offload {offload}")
    with bedlib.Bed(workdir, mtu=mtu, iperf=True) as bed:
        measure_all(bed, args, run)
    run["load_avg_end"] = os.getloadavg()
    run["wall_s"] = round(time.monotonic() - started, 1)
    publish(run, args)
    print(f"bed logs: {workdir}; {run['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
