"""The change record and lock (host/state.py), the resolver file (host/resolver.py)."""

from __future__ import annotations

import json
import os
import socket
from ipaddress import ip_interface
from pathlib import Path

import pytest

from tun2socks.host import resolver
from tun2socks.host.routes import describe
from tun2socks.host.state import AlreadyRunning, StateError, StateFile, devices_with_state

# --- the record and the lock -------------------------------------------------------------------


def test_a_second_lock_on_the_same_device_names_the_holder(tmp_path: Path) -> None:
    first = StateFile(tmp_path, "tun7")
    first.lock()
    second = StateFile(tmp_path, "tun7")
    with pytest.raises(
        AlreadyRunning, match=rf"already running on device tun7 \(pid {os.getpid()}\)"
    ):
        second.lock()
    assert not second.locked
    other = StateFile(tmp_path, "tun8")  # another device is independent
    other.lock()
    other.unlock()
    first.unlock()
    second.lock()  # free again
    second.unlock()


def test_unlock_removes_the_lock_file(tmp_path: Path) -> None:
    state = StateFile(tmp_path, "tun7")
    state.lock()
    assert state.lock_path.read_text() == f"{os.getpid()}\n"
    state.unlock()
    assert list(tmp_path.iterdir()) == []


def test_changes_are_on_disk_before_they_are_made(tmp_path: Path) -> None:
    state = StateFile(tmp_path, "tun7")
    state.lock()
    change = {"kind": "rule", "args": {"family": 2, "priority": 5202, "table": 7280}}
    state.record(change)
    on_disk = json.loads(state.path.read_text())
    assert on_disk["changes"] == [change]
    assert (on_disk["device"], on_disk["pid"], on_disk["version"]) == ("tun7", os.getpid(), 1)
    # What a later run (or `down`) finds if this one is killed now:
    assert StateFile(tmp_path, "tun7").leftover() == on_disk
    state.forget(change)
    assert json.loads(state.path.read_text())["changes"] == []
    state.remove()
    assert state.leftover() is None
    state.unlock()


def test_a_damaged_record_is_reported_not_guessed(tmp_path: Path) -> None:
    state = StateFile(tmp_path, "tun7")
    state.path.write_text("{not json")
    with pytest.raises(StateError, match="cannot read"):
        state.leftover()
    state.path.write_text('{"changes": 3}')
    with pytest.raises(StateError, match="not a tun2socks state file"):
        state.leftover()


def test_records_are_per_network_namespace(tmp_path: Path) -> None:
    state = StateFile(tmp_path, "tun7")
    state.lock()
    state.record({"kind": "rule", "args": {}})
    (tmp_path / "tun9@netns-1.json").write_text("{}")  # some other namespace's
    assert devices_with_state(tmp_path) == ["tun7"]
    state.unlock()


def test_a_state_dir_that_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match="cannot create state directory"):
        StateFile(blocker / "sub", "tun7").lock()


# --- how changes read in messages --------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "text"),
    [
        (
            {"kind": "route", "args": {"family": 2, "dst": "0.0.0.0/0", "oif": 5, "table": 7280}},
            "route 0.0.0.0/0 dev #5 table 7280",
        ),
        (
            {
                "kind": "route",
                "args": {"family": 10, "dst": "fd00::/8", "type": "throw", "table": 9},
            },
            "route -6 throw fd00::/8 table 9",
        ),
        (
            {
                "kind": "rule",
                "args": {"family": 2, "priority": 5200, "fwmark": 42, "table": 254},
            },
            "rule 5200: fwmark 0x2a lookup 254",
        ),
        (
            {
                "kind": "rule",
                "args": {"family": 2, "priority": 5201, "table": 254, "suppress_prefixlen": 0},
            },
            "rule 5201: lookup 254 suppress_prefixlength 0",
        ),
        ({"kind": "resolv_conf", "path": "/etc/resolv.conf"}, "resolver file /etc/resolv.conf"),
    ],
)
def test_describe(change: dict[str, object], text: str) -> None:
    assert describe(change) == text


# --- the resolver ------------------------------------------------------------------------------


def test_dns_server_is_the_next_address_in_each_tun_prefix() -> None:
    addresses = [
        ip_interface("198.18.0.1/15"),
        ip_interface("10.0.0.254/24"),  # the next one would be the broadcast address
        ip_interface("192.0.2.7/32"),  # no room
        ip_interface("fd00:7f::1/64"),
    ]
    assert resolver.dns_servers(addresses) == ["198.18.0.2", "10.0.0.253", "fd00:7f::2"]


def test_resolv_conf_is_pointed_and_restored(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    inode = resolv.stat().st_ino
    change = resolver.plan("tun7", ["198.18.0.2"], resolv)
    assert change["content"] == "nameserver 192.0.2.53\n"
    resolver.point(change)
    assert resolv.read_text().endswith("nameserver 198.18.0.2\n")
    assert resolv.stat().st_ino == inode  # rewritten in place: bind mounts keep working
    resolver.restore(change)
    assert resolv.read_text() == "nameserver 192.0.2.53\n"


def test_a_symlinked_resolv_conf_is_restored_as_the_link(tmp_path: Path) -> None:
    target = tmp_path / "real.conf"
    target.write_text("nameserver 192.0.2.53\n")
    resolv = tmp_path / "resolv.conf"
    resolv.symlink_to("real.conf")
    change = resolver.plan("tun7", ["198.18.0.2"], resolv)
    resolver.point(change)
    assert not resolv.is_symlink()
    assert target.read_text() == "nameserver 192.0.2.53\n"  # what it pointed to is untouched
    resolver.restore(change)
    assert os.readlink(resolv) == "real.conf"


def test_a_resolver_rewritten_by_someone_else_is_left_alone(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    change = resolver.plan("tun7", ["198.18.0.2"], resolv)
    resolver.point(change)
    resolv.write_text("nameserver 192.0.2.99\n")  # a DHCP client, meanwhile
    resolver.restore(change)
    assert resolv.read_text() == "nameserver 192.0.2.99\n"


def test_restore_of_a_change_never_made_changes_nothing(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    change = resolver.plan("tun7", ["198.18.0.2"], resolv)  # recorded, then killed
    resolver.restore(change)
    assert resolv.read_text() == "nameserver 192.0.2.53\n"


def test_families_in_records_are_the_socket_constants() -> None:
    # The record stores address families as numbers: they must mean the same on every run.
    assert (socket.AF_INET, socket.AF_INET6) == (2, 10)
