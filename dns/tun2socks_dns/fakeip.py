"""The fake-IP pool: a private address handed out per name, mapped back when a flow opens.

Theory of operation: in ``fake-ip`` mode an A (AAAA) query is answered with an address of a
configured IPv4 (IPv6) prefix. The pool remembers which name each address stands for; when a
TCP flow to that address arrives, the dialer asks ``lookup`` and opens the flow with SOCKS5
ATYP=DOMAINNAME, so the proxy resolves the name and the real address is never needed here.

- The same name gets the same address for as long as its mapping lives (``allocate`` reuses).
- Addresses are handed out in order until the prefix is used up; after that the least
  recently used mapping is recycled (LRU: both ``allocate`` and ``lookup`` count as use).
- A mapping used less than ``reuse_after`` seconds ago is never recycled: a client may still
  hold that address from an answer whose TTL has not run out, and giving the address to
  another name would send its connections to the wrong host. When every mapping is that
  fresh, ``allocate`` raises ``PoolExhausted`` (the forwarder answers SERVFAIL).
- The network address and, for IPv4, the broadcast address are never handed out.
- ``snapshot`` and ``restore`` carry the mappings over a restart (fakeip_store.py writes them
  to ``route.state_dir``): an application that resolved a name before still reaches that name
  after. Ages are kept as idle times, so the clock of the next run (monotonic, started anew)
  does not matter; ``changes`` counts new mappings, so that the store writes only when needed.

Pure: time is an argument.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class PoolExhausted(Exception):
    """Every address of the pool is mapped and was used too recently to be recycled."""


@dataclass
class _Mapping:
    name: str
    last_used: float


class FakeIpPool:
    def __init__(self, network: IPNetwork, *, reuse_after: float) -> None:
        first = int(network.network_address) + 1
        last = int(network.broadcast_address) - (1 if network.version == 4 else 0)
        if last < first:
            raise ValueError(f"fake-IP range {network} has no usable address")
        self.network = network
        self.reuse_after = reuse_after
        self._first = first
        self._last = last
        self._next_unused = first
        self._by_name: dict[str, int] = {}
        self._by_address: OrderedDict[int, _Mapping] = OrderedDict()  # least recently used first
        self.changes = 0  # new mappings made (or restored) so far

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def capacity(self) -> int:
        return self._last - self._first + 1

    def __len__(self) -> int:
        return len(self._by_address)

    def __contains__(self, address: object) -> bool:
        return isinstance(address, IPv4Address | IPv6Address) and address in self.network

    def allocate(self, name: str, now: float) -> IPAddress:
        """The address standing for ``name`` (the existing one, or a new one)."""
        name = _normal(name)
        number = self._by_name.get(name)
        if number is None:
            number = self._free_address(now)
            self._by_name[name] = number
            self._by_address[number] = _Mapping(name, now)
            self.changes += 1
        else:
            self._touch(number, now)
        return IPv6Address(number) if self.version == 6 else IPv4Address(number)

    def lookup(self, address: IPAddress, now: float) -> str | None:
        """The name ``address`` stands for, or None (outside the pool, or not mapped)."""
        if address not in self.network:
            return None
        number = int(address)
        mapping = self._by_address.get(number)
        if mapping is None:
            return None
        self._touch(number, now)
        return mapping.name

    def name_of(self, address: IPAddress) -> str | None:
        """The name ``address`` stands for, without counting as use (reverse lookups)."""
        if address not in self.network:
            return None
        mapping = self._by_address.get(int(address))
        return None if mapping is None else mapping.name

    def _touch(self, number: int, now: float) -> None:
        self._by_address[number].last_used = now
        self._by_address.move_to_end(number)

    def _free_address(self, now: float) -> int:
        if self._next_unused <= self._last:
            number = self._next_unused
            self._next_unused += 1
            return number
        number, oldest = next(iter(self._by_address.items()))
        if now - oldest.last_used < self.reuse_after:
            raise PoolExhausted(
                f"all {self.capacity} addresses of {self.network} were used within "
                f"the last {self.reuse_after:g} s"
            )
        del self._by_address[number]
        del self._by_name[oldest.name]
        return number

    def snapshot(self, now: float, limit: int) -> dict[str, Any]:
        """The pool as JSON-ready data: at most ``limit`` mappings, the most recently used,
        least recent first, each [offset in the network, name, seconds idle]."""
        base = int(self.network.network_address)
        mappings = [
            [number - base, mapping.name, max(0.0, round(now - mapping.last_used, 3))]
            for number, mapping in self._by_address.items()
        ]
        return {
            "network": str(self.network),
            "next": self._next_unused - base,
            "mappings": mappings[-limit:] if limit > 0 else [],
        }

    def restore(self, data: object, now: float, elapsed: float) -> int:
        """Take the mappings of a ``snapshot`` made ``elapsed`` seconds ago; how many were
        taken. Data for another network, and malformed entries, are skipped: a file from an
        older configuration must not map addresses outside the pool or crash the start."""
        if not isinstance(data, dict) or data.get("network") != str(self.network):
            return 0
        base = int(self.network.network_address)
        taken = 0
        for entry in data.get("mappings") or []:
            if not (isinstance(entry, list) and len(entry) == 3):
                continue
            offset, name, idle = entry
            if not (isinstance(offset, int) and isinstance(name, str) and name):
                continue
            if not isinstance(idle, int | float) or idle < 0:
                continue
            number = base + offset
            name = _normal(name)
            if not self._first <= number <= self._last or name in self._by_name:
                continue
            if number in self._by_address:
                continue
            self._by_name[name] = number
            self._by_address[number] = _Mapping(name, now - idle - max(0.0, elapsed))
            taken += 1
        # Entries came least recent first; a later allocation never reuses a restored address.
        next_unused = data.get("next")
        if isinstance(next_unused, int):
            self._next_unused = max(self._next_unused, min(base + next_unused, self._last + 1))
        if self._by_address:
            self._next_unused = max(self._next_unused, max(self._by_address) + 1)
        self.changes += taken
        return taken


def _normal(name: str) -> str:
    return name.rstrip(".").lower()
