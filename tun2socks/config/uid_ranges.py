"""User ids for per-user routing (``route.include_uids`` / ``route.exclude_uids``).

An entry is one uid (``1000`` or ``"1000"``) or an inclusive range (``"1000-1999"``), as the
kernel's ``FRA_UID_RANGE`` rule selector takes it (``ip rule ... uidrange 1000-1999``).
uid 4294967295 is ``(uid_t)-1``, "no uid", and cannot be matched.
"""

from __future__ import annotations

import re

MAX_UID = 0xFFFFFFFE
_RANGE = re.compile(r"\s*([0-9]{1,10})\s*(?:-\s*([0-9]{1,10})\s*)?")

UidRange = tuple[int, int]


def to_uid_range(value: object) -> UidRange:
    """``(first, last)`` of one entry; ValueError with a message for the config error line
    (which does not quote the value: the caller adds it, with any URL password hidden)."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        low, high = value
    elif isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and (match := _RANGE.fullmatch(value)):
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
    else:
        raise ValueError("must be a uid or a range like 1000-1999")
    if not 0 <= low <= MAX_UID or not 0 <= high <= MAX_UID:
        raise ValueError(f"uids must be between 0 and {MAX_UID}")
    if low > high:
        raise ValueError("range must not end below its start")
    return low, high


def describe(ranges: list[UidRange]) -> str:
    """``1000-1999, 42`` for log lines."""
    return ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


__all__ = ["MAX_UID", "UidRange", "describe", "to_uid_range"]
