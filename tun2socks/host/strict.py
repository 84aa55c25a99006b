"""The kill switch (``route.strict``): no direct path while tun2socks is not serving.

Theory of operation
-------------------
``route.auto`` sends traffic to the TUN through policy rules and a table (``route.table``)
whose default route leads into the TUN. That route belongs to the device: when tun2socks dies
(SIGKILL, a crash, the OOM killer) the kernel removes the TUN and its route, the lookup in
the table finds nothing, and the rules fall through to the main table: every connection
silently goes out directly. With ``route.strict`` the table also holds, for IPv4 and IPv6,

    unreachable default metric GUARD_METRIC     (below the TUN's route: a larger metric)

which stays when the TUN goes. The rules stay as well (they name no device), so after a crash
everything the rules catch meets ICMP "network unreachable" locally, except the proxy's host
route and the ``route.exclude`` prefixes, which keep their path. IPv6 gets the guard even when
the TUN has no IPv6: traffic is never routed around the tunnel because the proxy is reached
over IPv4.

A crash in strict mode leaves the whole record in ``route.state_dir`` as a SIGKILL would; only
``tun2socks down`` (or a clean stop: SIGINT, SIGTERM) lifts the block. The next start takes
the guard over instead of undoing it first, so the restart leaves no gap either: it undoes the
rest of the record, keeps the guard's rules and routes, and adopts each of them again when its
own set-up makes the same one (`Handover`).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Sequence

from tun2socks.host.state import Change

# Larger than any metric a route into the TUN gets (IPv6's default is 1024), so the TUN's
# default route wins while it exists.
GUARD_METRIC = 0x7FFFFFFF
DEFAULT_DST: dict[int, str] = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


def guard_routes(table: int, families: Iterable[int]) -> list[dict[str, object]]:
    """The arguments of the unreachable default routes, one per family (pyroute2 words)."""
    return [
        {
            "family": family,
            "dst": DEFAULT_DST[family],
            "type": "unreachable",
            "priority": GUARD_METRIC,
            "table": table,
        }
        for family in families
    ]


def is_guard_route(change: Change) -> bool:
    args = change.get("args", {})
    return (
        change.get("kind") == "route"
        and args.get("type") == "unreachable"
        and args.get("priority") == GUARD_METRIC
    )


def has_guard(changes: Sequence[Change]) -> bool:
    return any(is_guard_route(change) for change in changes)


def keeps_blocking(change: Change, table: int, rule_priorities: range) -> bool:
    """Part of what holds the block after a crash: the policy rules and every route of the
    table (guard, exclusions, the proxy's host route)."""
    kind, args = change.get("kind"), change.get("args", {})
    if kind == "rule":
        return args.get("priority") in rule_priorities
    return kind == "route" and args.get("table") == table


def split_leftover(
    changes: Sequence[Change], table: int, rule_priorities: range
) -> tuple[list[Change], list[Change]]:
    """(kept, to undo) of a record left by a strict run: the block stays up over a restart.
    A record without a guard (not strict, or another table) is all to undo."""
    if not has_guard(changes):
        return [], list(changes)
    kept: list[Change] = []
    undo: list[Change] = []
    for change in changes:
        (kept if keeps_blocking(change, table, rule_priorities) else undo).append(change)
    return kept, undo


def _key(change: Change) -> str:
    """Records come back from JSON: compare changes in that form."""
    return json.dumps(change, sort_keys=True)


class Handover:
    """The guard changes taken over from the run before, until this run makes them again."""

    def __init__(self, inherited: Sequence[Change] = ()) -> None:
        self._pending = {_key(change): change for change in inherited}

    def claim(self, change: Change) -> bool:
        """True when `change` was inherited (already made and recorded): now it is ours."""
        return self._pending.pop(_key(change), None) is not None

    def __bool__(self) -> bool:
        """Whether inherited changes wait to be claimed."""
        return bool(self._pending)

    def unclaimed(self) -> list[Change]:
        """Inherited changes this run did not make again (e.g. the proxy moved): to undo."""
        found = list(self._pending.values())
        self._pending.clear()
        return found
