"""Destinations whose upstream connected moments ago: the opt-in early SYN-ACK
(``proxy.early_accept``).

By default the engine answers a client's SYN only once the upstream is connected, so that a
refused CONNECT becomes a clean RST (RFC 9293 3.10.7.2) and never a connection that dies
after the client has sent data. For a destination (address, port) that connected within the
last ``ttl`` seconds, a failure is unlikely, and ``proxy.early_accept`` trades that guarantee
for a round trip: the SYN-ACK at once, the dial in parallel. A destination whose dial fails
leaves the table, so the next flow to it waits for its upstream again.

Pure: the caller gives the time (the loop's clock). At most ``capacity`` entries, the least
recently connected dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

DEFAULT_CAPACITY = 4096


@dataclass
class EarlyAcceptCounters:
    accepted: int = 0  # flows answered with SYN-ACK before their upstream was connected
    reset: int = 0  # of those, flows reset because the dial failed afterwards
    # Of those, flows whose CONNECT went on a ready pooled session without waiting for its
    # reply (engine: pending_connect.py), and of these the ones whose client data indeed left
    # before the reply came; and the ones whose session was found dead before any client
    # data was sent, dialed afresh unseen.
    pipelined: int = 0
    pipelined_first_data: int = 0
    pipelined_redialed: int = 0


@dataclass
class KnownDestinations:
    ttl: float
    capacity: int = DEFAULT_CAPACITY
    counters: EarlyAcceptCounters = field(default_factory=EarlyAcceptCounters)

    def __post_init__(self) -> None:
        if self.ttl <= 0 or self.capacity <= 0:
            raise ValueError("ttl and capacity must be positive")
        self._connected_at: OrderedDict[Hashable, float] = OrderedDict()

    def is_known(self, destination: Hashable, now: float) -> bool:
        """Whether `destination` connected less than `ttl` seconds before `now`."""
        when = self._connected_at.get(destination)
        if when is None:
            return False
        if now - when < self.ttl:
            return True
        del self._connected_at[destination]  # stale: forgotten
        return False

    def connected(self, destination: Hashable, now: float) -> None:
        """The upstream of a flow to `destination` connected at `now`."""
        entries = self._connected_at
        entries[destination] = now
        entries.move_to_end(destination)
        while len(entries) > self.capacity:
            entries.popitem(last=False)

    def failed(self, destination: Hashable) -> None:
        """A dial to `destination` failed: it is no longer known."""
        self._connected_at.pop(destination, None)

    def __len__(self) -> int:
        return len(self._connected_at)

    def stats(self) -> dict[str, int]:
        return {"known": len(self._connected_at), **vars(self.counters)}
