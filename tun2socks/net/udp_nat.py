"""The UDP NAT table: one session per client endpoint (sans-IO).

Theory of operation
-------------------
UDP has no connections, so the relay keeps state per client *source endpoint* (address,
port), whatever the destination: endpoint-independent mapping (RFC 4787 REQ-1). All
datagrams a client socket sends share one session (one SOCKS5 UDP association), and replies
from any remote address and port reach that socket, as games, VoIP and QUIC expect.

A session lives while traffic flows in either direction: `touch(key, now)` on every datagram
refreshes it, and one idle for `idle_timeout` seconds is returned by `expire(now)`. Because
the timeout is the same for every session, least recently used order is also deadline order:
the table is an `OrderedDict` kept in that order, so refresh, expiry and eviction are O(1).
When `max_sessions` are open, `add` evicts the least recently used session to make room (a
full table must not lock out new clients; the oldest idle session is the cheapest to lose).

The values are opaque to the table (the relay's session objects); time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

Endpoint = tuple[Hashable, int]  # (client address, client port)
S = TypeVar("S")


@dataclass(slots=True)
class _Entry(Generic[S]):
    session: S
    last_seen: float


class UdpNat(Generic[S]):
    """Client endpoint -> session, with idle expiry and a cap on the number of sessions."""

    def __init__(self, max_sessions: int, idle_timeout: float) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._entries: OrderedDict[Endpoint, _Entry[S]] = OrderedDict()
        self.created = 0
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Endpoint) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[tuple[Endpoint, S]]:
        return ((key, entry.session) for key, entry in list(self._entries.items()))

    def get(self, key: Endpoint) -> S | None:
        """The session of `key`, without refreshing it."""
        entry = self._entries.get(key)
        return entry.session if entry is not None else None

    def touch(self, key: Endpoint, now: float) -> S | None:
        """Refresh `key` (traffic seen now) and return its session, or None if there is none."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.last_seen = now
        self._entries.move_to_end(key)
        return entry.session

    def add(self, key: Endpoint, session: S, now: float) -> list[tuple[Endpoint, S]]:
        """Open a session for `key`; the sessions evicted to make room (to be closed)."""
        if key in self._entries:
            raise KeyError(f"a session for {key!r} exists")
        evicted = []
        while len(self._entries) >= self.max_sessions:
            old_key, entry = self._entries.popitem(last=False)
            evicted.append((old_key, entry.session))
            self.evicted += 1
        self._entries[key] = _Entry(session, now)
        self.created += 1
        return evicted

    def remove(self, key: Endpoint, session: S | None = None) -> S | None:
        """Forget `key` (only if it still maps to `session`, when given); its session or None."""
        entry = self._entries.get(key)
        if entry is None or (session is not None and entry.session is not session):
            return None
        del self._entries[key]
        return entry.session

    def expire(self, now: float) -> list[tuple[Endpoint, S]]:
        """Remove and return the sessions idle for `idle_timeout` or longer."""
        expired = []
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.last_seen + self.idle_timeout > now:
                break
            del entries[key]
            expired.append((key, entry.session))
        self.expired += len(expired)
        return expired

    @property
    def deadline(self) -> float | None:
        """When the least recently used session expires if nothing refreshes it, or None."""
        for entry in self._entries.values():
            return entry.last_seen + self.idle_timeout
        return None
