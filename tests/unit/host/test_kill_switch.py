"""route.strict, the kill switch: its guard routes, what a restart keeps of a crashed run's
record, and the hand-over to the new run (tun2socks.host.strict; pure, no netlink)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tun2socks.config import ConfigError, load_settings
from tun2socks.host import strict
from tun2socks.host.routes import Host
from tun2socks.host.state import Change, StateFile

TABLE = 7280
RULES = range(5200, 5203)


def route(**args: object) -> Change:
    return {"kind": "route", "args": {"table": TABLE, **args}}


def rule(priority: int, **args: object) -> Change:
    return {"kind": "rule", "args": {"family": socket.AF_INET, "priority": priority, **args}}


def crashed_strict_record() -> list[Change]:
    guards: list[Change] = [
        {"kind": "route", "args": a} for a in strict.guard_routes(TABLE, [2, 10])
    ]
    return [
        *guards,
        route(family=2, dst="0.0.0.0/0", oif=9),  # into the TUN: gone with it
        route(family=2, dst="192.168.0.0/16", type="throw"),
        route(family=2, dst="203.0.113.7/32", oif=2, gateway="192.168.1.1"),
        rule(5201, table=254, suppress_prefixlen=0),
        rule(5202, table=TABLE),
        {"kind": "resolv_conf", "path": "/etc/resolv.conf"},
    ]


def test_guard_is_an_unreachable_default_per_family_below_any_tun_route() -> None:
    guards = strict.guard_routes(TABLE, [socket.AF_INET, socket.AF_INET6])
    assert [(g["family"], g["dst"], g["type"]) for g in guards] == [
        (socket.AF_INET, "0.0.0.0/0", "unreachable"),
        (socket.AF_INET6, "::/0", "unreachable"),
    ]
    # IPv6 routes default to metric 1024; the TUN's route must win while it exists
    assert all(g["priority"] == strict.GUARD_METRIC > 1024 for g in guards)
    assert all(g["table"] == TABLE for g in guards)


def test_restart_after_a_strict_crash_keeps_rules_and_table_undoes_the_rest() -> None:
    record = crashed_strict_record()
    kept, undo = strict.split_leftover(record, TABLE, RULES)
    assert [c for c in record if c not in kept] == undo
    assert undo == [{"kind": "resolv_conf", "path": "/etc/resolv.conf"}]
    assert sum(strict.is_guard_route(c) for c in kept) == 2


def test_restart_after_a_run_without_guard_undoes_everything() -> None:
    record = [c for c in crashed_strict_record() if not strict.is_guard_route(c)]
    assert strict.split_leftover(record, TABLE, RULES) == ([], record)


def test_rules_of_other_priorities_and_routes_of_other_tables_are_not_kept() -> None:
    other_table: Change = {"kind": "route", "args": {"table": 99, "dst": "10.0.0.0/8"}}
    record = [*crashed_strict_record(), rule(100, table=TABLE), other_table]
    kept, undo = strict.split_leftover(record, TABLE, RULES)
    assert rule(100, table=TABLE) in undo and other_table in undo
    assert rule(100, table=TABLE) not in kept and other_table not in kept


def test_handover_claims_what_the_new_run_makes_again_compared_as_json() -> None:
    kept, _ = strict.split_leftover(crashed_strict_record(), TABLE, RULES)
    inherited = json.loads(json.dumps(kept))  # as read back from the state file
    handover = strict.Handover(inherited)
    for change in kept:
        if change["args"].get("oif") != 9:
            assert handover.claim(json.loads(json.dumps(change)))
    assert not handover.claim(rule(5202, table=TABLE))  # once only
    # the TUN's old route (old device index) is not made again: left to undo
    assert handover.unclaimed() == [route(family=2, dst="0.0.0.0/0", oif=9)]
    assert handover.unclaimed() == []


def test_strict_needs_auto(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("proxy: {url: 'socks5://192.0.2.1:1080'}\nroute: {strict: true}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path))
    assert "strict: true needs auto: true" in str(info.value)
    path.write_text("proxy: {url: 'socks5://192.0.2.1:1080'}\nroute: {auto: true, strict: true}\n")
    assert load_settings(str(path)).route.strict is True


def test_a_failed_strict_run_leaves_its_record_like_a_killed_one(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        [
            "proxy.url=socks5://192.0.2.1:1080",
            "route.auto=true",
            "route.strict=true",
            f"route.state_dir={tmp_path}",
        ],
    )
    host = Host(settings)
    host.state = StateFile(tmp_path, "tun9")
    host.state.lock()
    guard: Change = {"kind": "route", "args": strict.guard_routes(TABLE, [2])[0]}
    host.state.record(guard)
    host.close(failed=True)  # no netlink: nothing is undone
    leftover = StateFile(tmp_path, "tun9")
    leftover.lock()
    record = leftover.leftover()
    assert record is not None and record["changes"] == [guard]
    leftover.unlock()
