"""Per-user policy rules for ``route.auto``: ``route.include_uids`` and ``route.exclude_uids``.

The kernel matches a rule's ``FRA_UID_RANGE`` against the uid of the socket that sends (``ip
rule ... uidrange A-B``; forwarded packets count as uid 0 of the namespace). With these, the
rules of ``host/routes.py`` become:

    include_uids   5202  uidrange A-B lookup T      one per range, instead of "5202 lookup T"
    exclude_uids   5200  uidrange A-B lookup main   one per range, next to the fwmark rule

so only the listed users' traffic enters the TUN, or everyone's but theirs. Rule 5201
(``lookup main suppress_prefixlength 0``) is unchanged: local networks keep their path for all.
Loop prevention is unchanged too: tun2socks's own connections either belong to a user whose
traffic never enters the TUN, or follow the proxy's host route / ``route.mark`` as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tun2socks.config import RouteConfig


def uid_range_arg(low: int, high: int) -> str:
    """pyroute2's form of ``FRA_UID_RANGE``."""
    return f"{low}:{high}"


def exclusion_rules(
    route: RouteConfig, family: int, priority: int, main_table: int
) -> list[dict[str, Any]]:
    """``uidrange A-B lookup main`` for each excluded range (ahead of the TUN's rule)."""
    return [
        {
            "family": family,
            "priority": priority,
            "uid_range": uid_range_arg(low, high),
            "table": main_table,
        }
        for low, high in route.exclude_uids
    ]


def tun_rules(route: RouteConfig, family: int, priority: int) -> list[dict[str, Any]]:
    """The rule(s) that send traffic to the TUN's table: for everyone, or per included range."""
    if not route.include_uids:
        return [{"family": family, "priority": priority, "table": route.table}]
    return [
        {
            "family": family,
            "priority": priority,
            "uid_range": uid_range_arg(low, high),
            "table": route.table,
        }
        for low, high in route.include_uids
    ]


__all__ = ["exclusion_rules", "tun_rules", "uid_range_arg"]
