"""DNS cases shared by the atheris harness (fuzz_dns.py) and the hypothesis tests
(tests/unit/dns/test_fuzz_dns.py): client query templates, upstream answers for a question, a
mutator, and `DnsCheck`: the forwarder's pure core (`Resolver` with its cache, static hosts and
fake-IP pools, all with tiny caps) plus the checks run on every message.

Client bytes (`DnsCheck.query`): `Resolver.handle` raises nothing; a refused message is counted
once (dropped, formerr, notimp or badvers) and dropped only when it is shorter than a header or is a
response; an error reply carries the query's ID, QR and its rcode, fits a classic UDP reply
and parses. Every reply made for a client (hosts, fake address, cache hit, SERVFAIL) carries
the client's ID and question as written, packs for UDP within the client's limit and for TCP,
and both parse; TTLs from the cache are within its clamp; a fake address maps back to the name
it was handed out for; the canonical upstream request round-trips to the same question.

Upstream bytes (`DnsCheck.answer`): `parse_answer` raises only DNSError; a good answer is
remembered (cache) and gives a reply that passes the checks above, for the query that asked
and for the same query asked again (a cache hit or a new question).

After every step the cache and each fake-IP pool stay within their caps, and every message
handled is counted exactly once.
"""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from dnslib import (
    AAAA,
    CNAME,
    EDNS0,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TXT,
    A,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from tun2socks_dns.cache import CacheSettings, DnsCache
from tun2socks_dns.fakeip import FakeIpPool
from tun2socks_dns.hosts import DomainSet, StaticHosts
from tun2socks_dns.message import (
    CLASSIC_UDP_SIZE,
    FORMERR,
    HEADER_SIZE,
    MAX_TCP_MESSAGE,
    NOTIMP,
    TYPE_OPT,
    Query,
    is_good_answer,
    pack_for_tcp,
    pack_for_udp,
    parse_answer,
    question_key,
    upstream_request,
)
from tun2socks_dns.resolver import Answer, Ask, Refuse, Resolver

CACHE = CacheSettings(size=3, min_ttl=0, max_ttl=600, negative_ttl=60)
FAKE_RANGES = ("198.18.128.0/30", "fd00:7f:f::/126")  # 2 and 3 usable addresses
REUSE_AFTER = 10.0
UDP_CEILING = 1452  # MTU 1500 - IPv6 - UDP: what the forwarder is given on the bed
HOSTS = {"printer.lan": ["192.0.2.80", "fd00::80"], "v4only.lan": ["192.0.2.81"]}
MAX_ASKED = 8  # questions kept for the upstream to answer


def _query(
    name: str | DNSLabel,
    qtype: int = QTYPE.A,
    *,
    edns: int | None = None,
    rd: int = 1,
    cd: int = 0,
    opcode: int = 0,
) -> bytes:
    record = DNSRecord(DNSHeader(id=0x1234, rd=rd, cd=cd, opcode=opcode))
    record.add_question(DNSQuestion(name, qtype))
    if edns is not None:
        record.add_ar(EDNS0(udp_len=edns))
    return bytes(record.pack())


def _long_name_query(labels: int) -> bytes:
    """A question name of `labels` 63-byte labels: 5 make 321 bytes, beyond RFC 1035's 255."""
    name = b"".join(b"\x3f" + bytes([0x61 + i]) * 63 for i in range(labels)) + b"\x00"
    return bytes.fromhex("abcd01000001000000000000") + name + b"\x00\x01\x00\x01"


def _pointer_query() -> bytes:
    """A question name that is a compression pointer into the header (legal, odd)."""
    return bytes.fromhex("0474010000010000000000000474") + b"\xc0\x00\x00\x01\x00\x01"


PLAIN_QUERY = _query("www.example.com")
LONGEST_NAME_QUERY = _query(DNSLabel([b"x" * 63, b"y" * 63, b"z" * 63, b"w" * 61]))  # 253
LONG_NAME_QUERY = _long_name_query(5)


def _query_templates() -> list[bytes]:
    out = [
        PLAIN_QUERY,
        _query("WwW.ExAmPlE.CoM", QTYPE.AAAA, edns=4096),  # 0x20 case randomisation
        _query("printer.lan", QTYPE.A, edns=1232),
        _query("printer.lan", QTYPE.AAAA),
        _query("v4only.lan", QTYPE.AAAA),
        _query("a.real.test", QTYPE.A, cd=1),
        _query("svc.example.com", QTYPE.HTTPS, edns=100),  # a buffer below 512
        _query("svc.example.com", QTYPE.SVCB, rd=0),
        _query("example.com", QTYPE.TXT, edns=65535),
        _query("example.com", QTYPE.AXFR),
        _query("example.com", QTYPE.IXFR),
        _query("example.com", QTYPE.ANY),
        _query("example.com", opcode=2),  # STATUS
        _query("."),
        LONGEST_NAME_QUERY,
        _query(DNSLabel([b"a b", b"\x01\x7f", b"example"])),  # bytes no host name has
        LONG_NAME_QUERY,
        _pointer_query(),
    ]
    two = DNSRecord.question("a.example")
    two.add_question(DNSQuestion("b.example"))
    out.append(bytes(two.pack()))
    out.append(bytes(DNSRecord(DNSHeader(id=7, rd=1)).pack()))  # no question
    out.append(bytes(DNSRecord.question("r.example").reply().pack()))  # a response
    return out


QUERY_TEMPLATES = _query_templates()


def answer_templates(query: Query, request_id: int = 0x4242) -> list[bytes]:
    """Upstream answers to the canonical request for `query`: good, negative, failed, odd."""
    request = DNSRecord.parse(upstream_request(query.key, request_id))
    qname = request.q.qname
    out: list[bytes] = []

    def reply(rcode: int = RCODE.NOERROR, **flags: int) -> DNSRecord:
        record = request.reply()
        record.header.rcode = rcode
        for flag, value in flags.items():
            setattr(record.header, flag, value)
        return record

    def soa(ttl: int = 60, minimum: int = 30) -> RR:
        times = (1, 3600, 600, 86400, minimum)
        return RR(qname, QTYPE.SOA, ttl=ttl, rdata=SOA("ns.example", "admin.example", times))

    positive = reply()
    positive.add_answer(RR(qname, QTYPE.CNAME, ttl=120, rdata=CNAME("target.example")))
    positive.add_answer(RR("target.example", QTYPE.A, ttl=300, rdata=A("192.0.2.1")))
    positive.add_answer(RR("target.example", QTYPE.AAAA, ttl=5, rdata=AAAA("2001:db8::1")))
    positive.add_answer(RR(qname, QTYPE.TXT, ttl=0xFFFFFFFF, rdata=TXT("hello")))
    positive.add_ar(EDNS0(udp_len=1232))
    out.append(bytes(positive.pack()))
    nxdomain = reply(RCODE.NXDOMAIN)
    nxdomain.add_auth(soa())
    out.append(bytes(nxdomain.pack()))
    nodata = reply()
    nodata.add_auth(soa(ttl=7200, minimum=7200))
    out.append(bytes(nodata.pack()))
    out.append(bytes(reply(RCODE.NXDOMAIN).pack()))  # no SOA: not to be cached
    out.append(bytes(reply(RCODE.SERVFAIL).pack()))
    out.append(bytes(reply(tc=1).pack()))
    big = reply()
    for index in range(6):
        big.add_answer(RR(qname, QTYPE.TXT, ttl=60, rdata=TXT(bytes([0x61 + index]) * 250)))
    out.append(bytes(big.pack()))
    zero = reply()
    zero.add_answer(RR(qname, QTYPE.A, ttl=0, rdata=A("192.0.2.2")))
    out.append(bytes(zero.pack()))
    out.append(opt_only_answer(query, request_id))
    other = DNSRecord(DNSHeader(id=request_id, qr=1, ra=1), q=DNSQuestion("other.example"))
    out.append(bytes(other.pack()))
    out.append(bytes(request.pack()))  # a query, not an answer
    out.append(long_owner_answer(query, request_id))
    return out


def opt_only_answer(query: Query, request_id: int = 0x4242) -> bytes:
    """An answer section holding only an OPT record (it belongs in the additional section,
    RFC 6891 6.1.1)."""
    record = DNSRecord.parse(upstream_request(query.key, request_id)).reply()
    record.add_answer(RR(record.q.qname, TYPE_OPT, rclass=1232, ttl=0, rdata=[]))
    return bytes(record.pack())


def long_owner_answer(query: Query, request_id: int = 0x4242) -> bytes:
    """One A record whose owner name is 321 octets long (built by hand: dnslib will not)."""
    head = bytes(DNSRecord.parse(upstream_request(query.key, request_id)).reply().pack())
    owner = b"".join(b"\x3f" + b"o" * 63 for _ in range(5)) + b"\x00"
    record = owner + bytes.fromhex("0001000100000e100004c0000203")  # A IN 3600 192.0.2.3
    return head[:6] + b"\x00\x01" + head[8:] + record


def mutate(data: bytes, changes: list[tuple[int, int]], cut: int | None, tail: bytes) -> bytes:
    """`data` with bytes changed at positions (taken modulo its length), cut, then extended."""
    out = bytearray(data)
    if out:
        for position, value in changes:
            out[position % len(out)] = value & 0xFF
    if cut is not None:
        del out[cut % (len(out) + 1) :]
    return bytes(out) + tail


def new_resolver(fake: bool) -> Resolver:
    pools = [FakeIpPool(ip_network(r), reuse_after=REUSE_AFTER) for r in FAKE_RANGES]
    hosts = {name: [ip_address(a) for a in addresses] for name, addresses in HOSTS.items()}
    return Resolver(
        cache=DnsCache(CACHE),
        hosts=StaticHosts(hosts),
        fake_pools=pools if fake else None,
        real_domains=DomainSet(["real.test"]),
        fake_ttl=10,
        names_size=4,
    )


class DnsCheck:
    """One resolver, its clock, the questions waiting for an upstream, and the checks."""

    def __init__(self, *, fake: bool) -> None:
        self.resolver = new_resolver(fake)
        self.now = 1000.0
        self.asked: list[tuple[Query, bytes]] = []
        self.handled = 0

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def query(self, data: bytes) -> Answer | Ask | Refuse:
        before = Counter(self.resolver.counters)
        verdict = self.resolver.handle(data, self.now)
        self.handled += 1
        added = self.resolver.counters - before
        if isinstance(verdict, Refuse):
            outcome = {"dropped", "formerr", "notimp", "badvers"} & set(added)
            assert len(outcome) == 1 and added[outcome.pop()] == 1, (verdict, added)
            assert added[f"bad_{verdict.reason}"] == 1, (verdict, added)
            dropped = len(data) < HEADER_SIZE or bool(data[2] & 0x80)
            assert (verdict.reply is None) == dropped, verdict
            if verdict.reply is not None:
                check_error_reply(data, verdict.reply)
        else:
            assert added["queries"] == 1, added
            check_request(verdict.query)
            if isinstance(verdict, Answer):
                self.check_answer(verdict)
            else:
                self.check_reply(verdict.query, self.resolver.resolved(verdict.query, None))
                self.asked = [*self.asked[1 - MAX_ASKED :], (verdict.query, data)]
        self.check_caps()
        return verdict

    def answer(self, query: Query, data: bytes) -> None:
        """An upstream's `data` for `query`, as the forwarder would take it."""
        try:
            record = parse_answer(data, query.key)
        except DNSError:
            return
        if not is_good_answer(record):
            return
        self.resolver.remember(query.key, record, self.now)
        self.check_reply(query, self.resolver.resolved(query, record))
        self.check_caps()

    def check_answer(self, verdict: Answer) -> None:
        query, reply = verdict.query, verdict.reply
        self.check_reply(query, reply)
        if verdict.source == "cache":
            for rr in (*reply.rr, *reply.auth, *reply.ar):
                assert rr.rtype == TYPE_OPT or rr.ttl <= CACHE.max_ttl, rr
        if verdict.source == "fake":
            for rr in reply.rr:
                address = ip_address(str(rr.rdata))
                assert isinstance(address, IPv4Address | IPv6Address)
                assert self.resolver.is_fake(address), address
                assert self.resolver.domain_for(address, self.now) == query.domain

    def check_reply(self, query: Query, reply: DNSRecord) -> None:
        assert reply.header.id == query.id and reply.header.qr == 1
        assert [q.qname.label for q in reply.questions] == [query.question.qname.label]
        limit = query.udp_limit(UDP_CEILING)
        data, truncated = pack_for_udp(reply, limit)
        assert len(data) <= limit, (len(data), limit)
        parsed = DNSRecord.parse(data)
        assert parsed.header.id == query.id and parsed.header.tc == truncated
        has_opt = any(rr.rtype == TYPE_OPT for rr in parsed.ar)
        assert has_opt == (query.edns_size is not None), parsed
        stream = pack_for_tcp(reply)
        assert len(stream) <= MAX_TCP_MESSAGE
        DNSRecord.parse(stream)

    def check_caps(self) -> None:
        resolver = self.resolver
        assert len(resolver.cache) <= CACHE.size
        for pool in resolver.fake_pools.values():
            assert len(pool) <= pool.capacity
        outcomes = ("queries", "dropped", "formerr", "notimp", "badvers")
        counted = sum(resolver.counters[k] for k in outcomes)
        assert counted == self.handled, (resolver.counters, self.handled)


def check_error_reply(data: bytes, reply: bytes) -> None:
    assert HEADER_SIZE <= len(reply) <= CLASSIC_UDP_SIZE, reply
    assert reply[:2] == data[:2] and reply[2] & 0x80, reply
    parsed = DNSRecord.parse(reply)
    # BADVERS (16) is NOERROR in the header and extended RCODE 1 in the OPT record
    extended = [rr.ttl >> 24 for rr in parsed.ar if rr.rtype == QTYPE.OPT]
    assert (reply[3] & 0x0F, extended) in ((FORMERR, []), (NOTIMP, []), (0, [1])), reply


def check_request(query: Query) -> None:
    """The canonical question we would send upstream is the client's, lower-cased."""
    request = DNSRecord.parse(upstream_request(query.key, 1))
    assert len(request.questions) == 1 and question_key(request.questions[0]) == query.key
