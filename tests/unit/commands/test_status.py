"""`tun2socks status`: the report printed from the API's answers."""

from __future__ import annotations

from typing import Any

import pytest

from tun2socks.cli import main
from tun2socks.commands.status import human_bytes, human_duration, render

STATS: dict[str, Any] = {
    "uptime_s": 3725.5,
    "tun": {"packets_in": 120, "bytes_in": 5000, "packets_out": 300, "bytes_out": 3 * 1024**3},
    "flows": {"open": 2, "half_open": 0, "total": 40},
    "relayed": {"bytes_up": 4000, "bytes_down": 2 * 1024**3},
    "drops": {"ipv6_control": 3, "no_flow": 0},
    "upstream_errors": {"connection_refused": 2},
    "components": {"dns": {"queries": 9, "cache_hits": 4}},
    "pcap": {"running": True, "target": "memory", "packets": 7, "bytes": 900},
}
BUSY = {
    "id": 7,
    "protocol": "tcp",
    "source": "198.18.254.1:40000",
    "destination": "198.19.0.10:8080",
    "domain": "example.test",
    "route": "proxy",
    "state": "ESTABLISHED",
    "bytes_up": 93,
    "bytes_down": 5 * 1024**2,
    "age_s": 65.2,
}
QUIET = {**BUSY, "id": 12, "domain": None, "bytes_down": 10, "age_s": None, "state": "LISTEN"}


def test_totals_come_first() -> None:
    lines = render(STATS, [BUSY]).splitlines()
    assert lines[0] == "up 1h02m; flows: 2 open, 0 connecting, 40 since start"
    assert lines[1] == "TUN:      in 4.9 KiB (120 packets), out 3.0 GiB (300 packets)"
    assert "drops:    ipv6_control 3" in lines  # zero counters are left out
    assert "upstream errors: connection_refused 2" in lines
    assert "dns:      cache_hits 4, queries 9" in lines
    assert "capture:  running, 7 packets to memory" in lines


def test_connections_as_aligned_columns() -> None:
    lines = render(STATS, [BUSY, QUIET]).splitlines()
    header = lines.index(next(line for line in lines if line.startswith("ID ")))
    table = lines[header : header + 3]
    assert table[0].split() == [
        *("ID", "PROTO", "SOURCE", "DESTINATION", "ROUTE", "STATE", "UP", "DOWN", "AGE")
    ]
    assert "example.test (198.19.0.10:8080)" in table[1] and table[1].endswith("1m05s")
    assert table[2].endswith("-")  # no age known
    # every column starts at the same place in each row
    assert table[1].index("proxy") == table[2].index("proxy") == table[0].index("ROUTE")
    assert table[1].index("5.0 MiB") + len("5.0 MiB") == table[0].index("DOWN") + len("DOWN")


def test_no_connections() -> None:
    assert render(STATS, []).splitlines()[-1] == "no open connections"


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**4, "5120.0 GiB")],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_human_duration() -> None:
    assert [human_duration(s) for s in (5, 65, 3600)] == ["5s", "1m05s", "1h00m"]


def test_unreachable_api_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--api", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tun2socks: error: cannot reach the API at http://127.0.0.1:1/stats")
    assert "\n" not in err
