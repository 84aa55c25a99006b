"""Per-user routing: route.include_uids / route.exclude_uids parsing and the rules they make."""

from __future__ import annotations

import socket

import pytest

from tun2socks.config import ConfigError, load_settings
from tun2socks.config.uid_ranges import describe, to_uid_range
from tun2socks.host.routes import describe as describe_change
from tun2socks.host.uid_rules import exclusion_rules, tun_rules

PROXY = "proxy.url=socks5://192.0.2.1:1080"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, (0, 0)), ("1000", (1000, 1000)), ("1000-1999", (1000, 1999)), (" 5 - 7 ", (5, 7))],
)
def test_uid_entries(value: object, expected: tuple[int, int]) -> None:
    assert to_uid_range(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("7-5", "must not end below its start"),
        ("4294967295", "between 0 and 4294967294"),
        (-1, "between 0"),
        ("alice", "a uid or a range"),
        (True, "a uid or a range"),
        ("1-2-3", "a uid or a range"),
    ],
)
def test_bad_uid_entries_are_refused(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_uid_range(value)


def test_config_takes_one_or_a_list_and_needs_route_auto() -> None:
    settings = load_settings(None, [PROXY, "route.auto=true", "route.include_uids=1000-1999"])
    assert settings.route.include_uids == [(1000, 1999)]
    settings = load_settings(None, [PROXY, "route.auto=true", "route.exclude_uids=[0, 42-43]"])
    assert describe(settings.route.exclude_uids) == "0, 42-43"
    with pytest.raises(ConfigError, match=r"choose whom route\.auto routes"):
        load_settings(None, [PROXY, "route.include_uids=1000"])
    with pytest.raises(ConfigError, match="cannot be used together"):
        load_settings(
            None, [PROXY, "route.auto=true", "route.include_uids=1", "route.exclude_uids=2"]
        )
    with pytest.raises(ConfigError, match=r"route.include_uids.*range like 1000-1999"):
        load_settings(None, [PROXY, "route.auto=true", "route.include_uids=[bob]"])


def test_include_uids_turn_the_tun_rule_into_one_rule_per_range() -> None:
    route = load_settings(
        None, [PROXY, "route.auto=true", "route.include_uids=[1000-1999, 42]"]
    ).route
    rules = tun_rules(route, socket.AF_INET6, 5202)
    assert [describe_change({"kind": "rule", "args": args}) for args in rules] == [
        "rule -6 5202: uidrange 1000-1999 lookup 7280",
        "rule -6 5202: uidrange 42-42 lookup 7280",
    ]
    assert exclusion_rules(route, socket.AF_INET6, 5200, 254) == []


def test_exclude_uids_add_main_table_rules_and_keep_the_tun_rule_for_everyone() -> None:
    route = load_settings(None, [PROXY, "route.auto=true", "route.exclude_uids=0"]).route
    rules = exclusion_rules(route, socket.AF_INET, 5200, 254)
    assert [describe_change({"kind": "rule", "args": args}) for args in rules] == [
        "rule 5200: uidrange 0-0 lookup 254"
    ]
    assert tun_rules(route, socket.AF_INET, 5202) == [
        {"family": socket.AF_INET, "priority": 5202, "table": 7280}
    ]
