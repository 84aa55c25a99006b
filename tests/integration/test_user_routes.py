"""Per-user routing (route.include_uids / route.exclude_uids) in the namespace bed.

Two users of the client namespace (plain uids: setpriv needs no passwd entry) fetch the HTTP
server's /peer: the proxied one is seen from the proxy's address, the other one from the
client's veth (the uplink, set_uplink). Teardown must leave the rules as they were.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration import bed as bedlib

# The helpers and fixtures of the route.auto tests (uplink, a snapshot before tun2socks).
from tests.integration.test_routes import (
    PROXIED_PEER,
    PROXIED_PEER6,
    before,
    route_config,
    rules_of,
    run_cli_tool,
    snapshot,
    uplink,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(bedlib.missing_requirements()) or bedlib.which("setpriv") is None,
        reason="needs setpriv and " + ", ".join(bedlib.missing_requirements()),
    ),
]

__all__ = ["before", "uplink"]  # fixtures, used by name

TUNNELLED_UID, OTHER_UID = 4242, 4343
TARGET = f"{bedlib.TARGET_IP}:{bedlib.HTTP_PORT}"
TARGET6 = f"[{bedlib.TARGET_IP6}]:{bedlib.HTTP_PORT}"


def peer_as(bed: bedlib.Bed, uid: int, host_port: str) -> str:
    """What the HTTP server saw as the source of a request made by `uid`."""
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    proc: subprocess.CompletedProcess[str] = bed.run_cli(
        [*as_user, "curl", "-sS", "-g", "--max-time", "10", f"http://{host_port}/peer"],
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("way", ["include_uids", "exclude_uids"])
def test_only_the_chosen_user_goes_through_the_proxy_and_teardown_restores_the_rules(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    before: dict[str, list[str]],
    way: str,
) -> None:
    # Without tun2socks both users reach the server directly.
    assert peer_as(bed, TUNNELLED_UID, TARGET) == bedlib.CLI_VETH_IP
    assert peer_as(bed, OTHER_UID, TARGET) == bedlib.CLI_VETH_IP
    chosen = TUNNELLED_UID if way == "include_uids" else OTHER_UID
    # A range next to a single uid, as users write them.
    extra = route_config(artifact_dir, **{way: [f"{chosen}-{chosen}", 1]})
    t2s = start_tun2socks(routes=False, extra=extra)
    rules = rules_of(bed)
    action = "lookup 7280" if way == "include_uids" else "lookup main"
    assert f"uidrange {chosen}-{chosen} {action}" in rules, rules
    assert f"uidrange 1-1 {action}" in rules, rules

    assert peer_as(bed, TUNNELLED_UID, TARGET) == PROXIED_PEER
    assert peer_as(bed, TUNNELLED_UID, TARGET6) == PROXIED_PEER6
    assert peer_as(bed, OTHER_UID, TARGET) == bedlib.CLI_VETH_IP
    assert peer_as(bed, OTHER_UID, TARGET6) == bedlib.CLI_VETH_IP6
    # tun2socks (root, uid 0) reaches the proxy outside the TUN either way: no loop.
    assert f"-> {bedlib.SRV_VETH_IP}:{bedlib.SOCKS_PORT}" not in t2s.log_text()

    assert t2s.stop() == 0
    assert snapshot(bed) == before
    assert "uidrange" not in rules_of(bed)
    state = artifact_dir / "state"
    assert list(state.iterdir()) == [], json.dumps([p.name for p in state.iterdir()])


def test_uid_rules_left_by_a_killed_run_are_undone_by_down(
    bed: bedlib.Bed,
    start_tun2socks: bedlib.StartTun2socks,
    artifact_dir: Path,
    before: dict[str, list[str]],
) -> None:
    extra = route_config(artifact_dir, include_uids=[f"{TUNNELLED_UID}"])
    t2s = start_tun2socks(routes=False, extra=extra)
    assert peer_as(bed, TUNNELLED_UID, TARGET) == PROXIED_PEER
    t2s.process.kill()
    t2s.process.wait(10)
    assert f"uidrange {TUNNELLED_UID}-{TUNNELLED_UID} lookup 7280" in rules_of(bed)
    down = run_cli_tool(bed, "down", "--state-dir", str(artifact_dir / "state"))
    assert down.returncode == 0, down.stderr
    assert "uidrange" not in rules_of(bed)
    assert snapshot(bed) == before
