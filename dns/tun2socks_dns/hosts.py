"""Static names from the config: ``dns.hosts`` entries and the ``dns.real_domains`` list; pure.

A hosts name answers A and AAAA itself, like /etc/hosts: the addresses of the asked family, or
an empty NOERROR answer ("NODATA") when it has none of that family, so that an upstream never
contradicts the entry. Other query types for that name go upstream as usual.

A domain list entry ``example.com`` matches ``example.com`` and every name below it
(``www.example.com``); a leading ``*.`` or ``.`` is accepted and means the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address


def normal_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


class StaticHosts:
    def __init__(self, entries: Mapping[str, Sequence[IPAddress]]) -> None:
        self._entries: dict[str, tuple[IPAddress, ...]] = {}
        for name, addresses in entries.items():
            key = normal_name(name)
            self._entries[key] = self._entries.get(key, ()) + tuple(addresses)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, name: str, version: int) -> list[IPAddress] | None:
        """The addresses of ``name`` of IP ``version``; None when the name is not an entry."""
        addresses = self._entries.get(normal_name(name))
        if addresses is None:
            return None
        return [address for address in addresses if address.version == version]


class DomainSet:
    def __init__(self, domains: Iterable[str]) -> None:
        self._suffixes = {normal_name(d).removeprefix("*.").lstrip(".") for d in domains}
        self._suffixes.discard("")

    def __len__(self) -> int:
        return len(self._suffixes)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not self._suffixes:
            return False
        labels = normal_name(name).split(".")
        return any(".".join(labels[i:]) in self._suffixes for i in range(len(labels)))
