"""Rules: which way a flow leaves (through a proxy, directly, or not at all).

Theory of operation
-------------------
A ``RuleSet`` is an ordered list of ``Rule``; the first rule whose conditions all hold decides,
and when none does the default decides (``proxy``, through the default proxy). A rule's
conditions are its destination prefixes, ports, protocol and domain patterns; each is a list
(any item may match), an empty list matches everything, so a rule with no condition at all is a
catch-all. A domain condition holds only when the flow's domain is known (the DNS forwarder's
answer or fake-IP mapping); a flow to an address nobody looked up never matches one.

Domain patterns use ``*`` for any run of characters (dots included) and ``?`` for one, compared
without case and without the trailing dot: ``*.example.com`` matches ``a.example.com`` and
``a.b.example.com`` but not ``example.com`` itself (list both for both).

This module is pure: no sockets, no clock, no I/O; ``tun2socks.outbound.routing`` applies it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class Action(enum.StrEnum):
    PROXY = "proxy"
    DIRECT = "direct"
    BLOCK = "block"


@dataclass(frozen=True)
class Decision:
    """What to do with one flow, and why (``rule`` is the 0-based index, None: the default)."""

    action: Action
    proxy: str | None = None  # a name from `proxies`; None: the default proxy
    rule: int | None = None

    def __str__(self) -> str:
        why = f"rule {self.rule}" if self.rule is not None else "default"
        via = f" {self.proxy}" if self.proxy is not None else ""
        return f"{self.action.value}{via} by {why}"


DEFAULT_DECISION = Decision(Action.PROXY)


def domain_pattern_regex(patterns: Sequence[str]) -> re.Pattern[str]:
    """One regex matching a (lower-case, dot-stripped) name against any of `patterns`."""
    parts = []
    for pattern in patterns:
        text = re.escape(pattern.lower().rstrip("."))
        parts.append(text.replace(r"\*", ".*").replace(r"\?", "."))
    return re.compile("|".join(f"(?:{p})" for p in parts))


@dataclass(frozen=True)
class Rule:
    number: int
    action: Action
    proxy: str | None = None
    networks: tuple[IPNetwork, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges
    protocol: str | None = None  # "tcp" | "udp" | None (both)
    domains: tuple[str, ...] = ()
    _domain_regex: re.Pattern[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.proxy is not None and self.action is not Action.PROXY:
            raise ValueError(f"rule {self.number}: a proxy name needs action proxy")
        if self.domains:
            object.__setattr__(self, "_domain_regex", domain_pattern_regex(self.domains))

    @property
    def decision(self) -> Decision:
        return Decision(self.action, self.proxy, self.number)

    def matches(self, dst: IPAddress | None, port: int, protocol: str, domain: str | None) -> bool:
        if self.protocol is not None and protocol != self.protocol:
            return False
        if self.ports and not any(low <= port <= high for low, high in self.ports):
            return False
        if self.networks and (dst is None or not any(dst in net for net in self.networks)):
            return False
        if self._domain_regex is not None:
            if domain is None:
                return False
            return self._domain_regex.fullmatch(domain.lower().rstrip(".")) is not None
        return True


class RuleSettings(Protocol):
    """The shape of one configured rule (``tun2socks.config.RuleConfig``)."""

    @property
    def dst(self) -> Sequence[IPNetwork]: ...
    @property
    def port(self) -> Sequence[tuple[int, int]]: ...
    @property
    def protocol(self) -> str | None: ...
    @property
    def domain(self) -> Sequence[str]: ...
    @property
    def action(self) -> str: ...
    @property
    def proxy(self) -> str | None: ...


class RuleSet:
    """Ordered rules, first match wins; `default` when none matches."""

    def __init__(self, rules: Sequence[Rule], default: Decision = DEFAULT_DECISION) -> None:
        self.rules = tuple(rules)
        self.default = default
        # Only then is the domain worth looking up for a flow.
        self.uses_domains = any(rule.domains for rule in self.rules)

    @classmethod
    def from_settings(cls, rules: Sequence[RuleSettings]) -> RuleSet:
        return cls(
            [
                Rule(
                    number=number,
                    action=Action(rule.action),
                    proxy=rule.proxy,
                    networks=tuple(rule.dst),
                    ports=tuple(rule.port),
                    protocol=rule.protocol,
                    domains=tuple(rule.domain),
                )
                for number, rule in enumerate(rules)
            ]
        )

    def decide(
        self,
        dst: IPAddress | None,
        port: int,
        protocol: str = "tcp",
        domain: str | None = None,
    ) -> Decision:
        """The decision for a flow to `dst` (None when only a name is known) and `port`."""
        for rule in self.rules:
            if rule.matches(dst, port, protocol, domain):
                return rule.decision
        return self.default

    def __len__(self) -> int:
        return len(self.rules)
