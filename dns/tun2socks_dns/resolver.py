"""What to do with one client query: answer it here, or ask an upstream; pure, no I/O.

Theory of operation: ``handle(data, now)`` returns one of
- ``Answer``: a reply made here (hosts entry, fake address, cache hit), ready to pack;
- ``Ask``: the question must go upstream; the driver later calls ``resolved(query, answer,
  now)`` with the upstream's answer (or None when none came) to get the client's reply, after
  ``remember(key, answer, now)`` once per upstream answer;
- ``Refuse``: the bytes are not a query we answer normally: send ``reply`` (FORMERR, NOTIMP)
  or drop when it is None.

In order: static hosts (A/AAAA) win; PTR queries for an address of a fake-IP pool are answered
from the pool (its name, or NXDOMAIN when unassigned: asking upstream would leak a private
address and get the wrong answer); then, in ``fake-ip`` mode, A/AAAA for names outside
``real_domains`` get a fake address, and HTTPS/SVCB queries for them get an empty answer (their
address hints would otherwise hand out real addresses); then the cache; then upstream.

``domain_for(address)`` is the reverse direction for the rest of the program: the name a fake
address stands for, or else the name a real address was last answered for (bounded, for rules
that match on domains).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from dnslib import QTYPE, DNSRecord

from .cache import DnsCache
from .fakeip import FakeIpPool, PoolExhausted
from .hosts import DomainSet, StaticHosts
from .message import (
    CLASS_IN,
    NOT_IMPLEMENTED,
    SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_PTR,
    BadQuery,
    Query,
    QuestionKey,
    client_reply,
    domain_text,
    local_answer,
    parse_query,
    ptr_answer,
    reverse_address,
)

IPAddress = IPv4Address | IPv6Address
HOSTS_TTL = 60  # seconds; entries change only with the config, but clients should re-ask
ADDRESS_TYPES = {TYPE_A: 4, TYPE_AAAA: 6}
ADDRESS_HINT_TYPES = frozenset({QTYPE.SVCB, QTYPE.HTTPS})  # RFC 9460 ipv4hint/ipv6hint
# the counter of each error reply that is not FORMERR
_ERROR_COUNTER = {**dict.fromkeys(NOT_IMPLEMENTED, "notimp"), "badvers": "badvers"}


@dataclass(frozen=True)
class Answer:
    query: Query
    reply: DNSRecord
    source: str  # "hosts", "fake", "cache"


@dataclass(frozen=True)
class Ask:
    query: Query


@dataclass(frozen=True)
class Refuse:
    reason: str
    reply: bytes | None


class Resolver:
    def __init__(
        self,
        *,
        cache: DnsCache,
        hosts: StaticHosts,
        fake_pools: list[FakeIpPool] | None = None,
        real_domains: DomainSet | None = None,
        fake_ttl: int = 10,
        names_size: int = 4096,
    ) -> None:
        self.cache = cache
        self.hosts = hosts
        self.fake_pools = {pool.version: pool for pool in fake_pools or []}
        self.fake_mode = fake_pools is not None
        self.real_domains = real_domains or DomainSet(())
        self.fake_ttl = fake_ttl
        self.counters: Counter[str] = Counter()
        self._names: OrderedDict[IPAddress, str] = OrderedDict()
        self._names_size = names_size

    def handle(self, data: bytes, now: float) -> Answer | Ask | Refuse:
        try:
            query = parse_query(data)
        except BadQuery as bad:
            if bad.reply is None:
                self.counters["dropped"] += 1
            else:
                self.counters[_ERROR_COUNTER.get(bad.reason, "formerr")] += 1
            self.counters[f"bad_{bad.reason}"] += 1
            return Refuse(bad.reason, bad.reply)
        self.counters["queries"] += 1
        local = self._local(query, now)
        if local is not None:
            return local
        cached = self.cache.get(query.key, now)
        if cached is not None:
            self.counters["cache_hits"] += 1
            answer, elapsed = cached
            return Answer(query, client_reply(query, answer, elapsed=elapsed), "cache")
        self.counters["cache_misses"] += 1
        return Ask(query)

    def _local(self, query: Query, now: float) -> Answer | None:
        domain = query.domain
        _labels, qtype, qclass = query.key
        if domain is None or qclass != CLASS_IN:
            return None
        version = ADDRESS_TYPES.get(qtype)
        if version is not None:
            addresses = self.hosts.lookup(domain, version)
            if addresses is not None:
                self.counters["hosts_answers"] += 1
                return self._made(query, addresses, HOSTS_TTL, "hosts")
        if qtype == TYPE_PTR and self.fake_pools:
            reverse = self._fake_reverse(query)
            if reverse is not None:
                return reverse
        if not self.fake_mode or domain in self.real_domains:
            return None
        if version is not None:
            pool = self.fake_pools.get(version)
            if pool is None:  # no range of this family: "no such record", not an error
                return self._made(query, [], self.fake_ttl, "fake")
            try:
                address = pool.allocate(domain, now)
            except PoolExhausted:
                self.counters["fake_exhausted"] += 1
                return self._made(query, [], 0, "fake", rcode=SERVFAIL)
            self.counters["fake_answers"] += 1
            return self._made(query, [address], self.fake_ttl, "fake")
        if qtype in ADDRESS_HINT_TYPES:
            return self._made(query, [], self.fake_ttl, "fake")
        return None

    def _fake_reverse(self, query: Query) -> Answer | None:
        """A PTR answer for an address of a fake-IP pool; None for any other name."""
        address = reverse_address(query.key[0])
        pool = None if address is None else self.fake_pools.get(address.version)
        if address is None or pool is None or address not in pool:
            return None
        name = pool.name_of(address)
        self.counters["fake_ptr_answers"] += 1
        return Answer(query, client_reply(query, ptr_answer(query, name, self.fake_ttl)), "fake")

    def _made(
        self, query: Query, addresses: list[IPAddress], ttl: int, source: str, *, rcode: int = 0
    ) -> Answer:
        record = local_answer(query, addresses, ttl, rcode=rcode)
        return Answer(query, client_reply(query, record), source)

    def remember(self, key: QuestionKey, answer: DNSRecord, now: float) -> None:
        """An upstream's good answer: into the cache, and its addresses into the name map."""
        self.cache.put(key, answer, now)
        domain = domain_text(key[0])
        if domain is None or key[1] not in ADDRESS_TYPES:
            return
        for rr in answer.rr:
            if rr.rtype in ADDRESS_TYPES:
                try:
                    address = ip_address(str(rr.rdata))
                except ValueError:
                    continue
                self._names[address] = domain
                self._names.move_to_end(address)
        while len(self._names) > self._names_size:
            self._names.popitem(last=False)

    def resolved(self, query: Query, answer: DNSRecord | None) -> DNSRecord:
        """The reply for ``query`` from an upstream's ``answer``; SERVFAIL when there is none."""
        if answer is None:
            self.counters["servfail"] += 1
            return _servfail(query)
        return client_reply(query, answer)

    def is_fake(self, address: IPAddress) -> bool:
        pool = self.fake_pools.get(address.version)
        return pool is not None and address in pool

    def domain_for(self, address: IPAddress, now: float) -> str | None:
        pool = self.fake_pools.get(address.version)
        if pool is not None and address in pool:
            return pool.lookup(address, now)
        return self._names.get(address)


def _servfail(query: Query) -> DNSRecord:
    return client_reply(query, local_answer(query, [], 0, rcode=SERVFAIL))
