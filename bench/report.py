"""Results of one run: the JSON file, the Markdown table, and the sections of bench/README.md.

bench/README.md holds one table per configuration variant between markers
`<!-- bench:VARIANT:begin -->` and `<!-- bench:VARIANT:end -->` (VARIANT is `defaults` or
`mtu1500-no-offload`, or a section named with `--section`, such as `before`), the connection
timeline of each in `timeline-VARIANT`, and the profile between `<!-- bench:profile:begin/end -->`.
A run rewrites only its own section's table, and only when it measured every row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .rows import LABEL_CEILING, LABEL_TUN
from .targets import Verdict

BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR / "README.md"
RESULTS_DIR = BENCH_DIR / "results"

VARIANT_DEFAULTS = "defaults"
VARIANT_PLAIN = "mtu1500-no-offload"


def variant_of(mtu_given: int | None, offload: bool) -> str | None:
    """Which README section a configuration fills: the shipped defaults, MTU 1500 without
    offloads, or none (any other combination is printed and saved, not published)."""
    if mtu_given is None and offload:
        return VARIANT_DEFAULTS
    if mtu_given == 1500 and not offload:
        return VARIANT_PLAIN
    return None


def _met(verdict: Verdict) -> str:
    return {True: "**met**", False: "**not met**", None: "-"}[verdict.met]


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(report: dict[str, Any], verdicts: list[Verdict], chart: str | None) -> str:
    host = report["host"]
    load = report.get("load_avg_start") or (0.0,)
    lines = [
        f"Run {report['date']} on {host['cpus']} CPUs, kernel {host['kernel']}, "
        f"Python {host['python']}, commit {report['commit'] or '?'}; TUN MTU {report['mtu']}, "
        f"offloads {'on' if report['offload'] else 'off'}; iperf3 {report['iperf_secs']} s per "
        f"test; load average at start {load[0]:.2f}; raw results "
        f"`bench/results/{report['file']}`.",
        "",
        f"| row | {LABEL_TUN} | {LABEL_CEILING} (ceiling) | {LABEL_TUN} / ceiling | target | |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        if v.ours == "-" and v.ceiling == "-":
            continue  # not measured in this run (--rows)
        cells = (v.row, v.ours, v.ceiling, v.ratio, v.target, _met(v))
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    met = [v for v in verdicts if v.met is not None]
    lines += [
        "",
        f"{sum(v.met is True for v in met)} of {len(met)} target rows met. "
        "Rates, throughput and latency are medians where a row runs several times; "
        "CPU is the tun2socks process's share of one core during the test.",
    ]
    errors = report["labels"].get(LABEL_TUN, {}).get("error")
    if errors:
        lines += ["", f"{LABEL_TUN} did not run: `{str(errors).splitlines()[0][:200]}`"]
    if chart:
        lines += ["", f"![tun2socks against the targets]({chart})"]
    return "\n".join(lines)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def has_section(name: str, readme: Path = README) -> bool:
    begin, end = _markers(name)
    text = readme.read_text()
    return begin in text and end in text


def replace_section(name: str, body: str, readme: Path = README) -> None:
    begin, end = _markers(name)
    text = readme.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: markers {begin} / {end} not found")
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text, count=1))


def write_json(report: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path: Path = RESULTS_DIR / report["file"]
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
