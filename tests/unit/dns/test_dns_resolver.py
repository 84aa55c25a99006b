"""The forwarder's pure core: queries in, local answers / upstream questions / errors out."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, TXT, A, DNSRecord

import tun2socks_dns
from tests.support.import_scan import IO_MODULES, imported_modules
from tun2socks_dns.cache import CacheSettings, DnsCache
from tun2socks_dns.fakeip import FakeIpPool
from tun2socks_dns.hosts import DomainSet, StaticHosts
from tun2socks_dns.message import (
    CLASSIC_UDP_SIZE,
    pack_for_udp,
    parse_answer,
    upstream_request,
)
from tun2socks_dns.resolver import Answer, Ask, Refuse, Resolver
from tun2socks_dns.urls import parse_upstream

FORBIDDEN_IMPORTS = IO_MODULES | {"aiohttp"}
PURE_MODULES = ("cache", "fakeip", "hosts", "message", "resolver", "selection", "urls")


def query(name: str, qtype: str = "A", *, edns: int | None = None, qid: int = 4242) -> bytes:
    record = DNSRecord.question(name, qtype)
    record.header.id = qid
    if edns is not None:
        record.add_ar(EDNS0(udp_len=edns))
    return bytes(record.pack())


def resolver(*, fake: bool = False, hosts: dict[str, list[str]] | None = None) -> Resolver:
    pools = None
    if fake:
        pools = [
            FakeIpPool(ip_network("198.18.128.0/30"), reuse_after=10.0),
            FakeIpPool(ip_network("fd00:7f:f::/112"), reuse_after=10.0),
        ]
    entries = {name: [ip_address(a) for a in addrs] for name, addrs in (hosts or {}).items()}
    return Resolver(
        cache=DnsCache(CacheSettings()),
        hosts=StaticHosts(entries),
        fake_pools=pools,
        real_domains=DomainSet(["real.test"]),
        fake_ttl=10,
    )


def upstream_answer(name: str, *addresses: str, ttl: int = 300) -> DNSRecord:
    record = DNSRecord.question(name).reply()
    for address in addresses:
        record.add_answer(RR(name, QTYPE.A, ttl=ttl, rdata=A(address)))
    return record


def reply_of(verdict: Answer | Ask | Refuse) -> DNSRecord:
    assert isinstance(verdict, Answer), verdict
    return verdict.reply


# --- bad input ---------------------------------------------------------------------------------


def test_short_message_is_dropped() -> None:
    r = resolver()
    assert r.handle(b"\x12\x34\x01", 0.0) == Refuse("short", None)
    assert r.counters["dropped"] == 1


def test_response_sent_to_us_is_dropped_not_answered() -> None:
    data = bytes(upstream_answer("a.test", "192.0.2.1").pack())
    verdict = resolver().handle(data, 0.0)
    assert isinstance(verdict, Refuse) and verdict.reply is None


def test_garbage_after_a_header_gets_formerr_with_the_id() -> None:
    r = resolver()
    verdict = r.handle(b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff", 0.0)
    assert isinstance(verdict, Refuse) and verdict.reply is not None
    reply = DNSRecord.parse(verdict.reply)
    assert (reply.header.id, reply.header.qr, reply.header.rcode) == (0xABCD, 1, RCODE.FORMERR)
    assert r.counters["formerr"] == 1


def test_two_questions_get_formerr() -> None:
    record = DNSRecord.question("a.test")
    record.add_question(DNSRecord.question("b.test").q)
    verdict = resolver().handle(bytes(record.pack()), 0.0)
    assert isinstance(verdict, Refuse) and verdict.reply is not None
    assert DNSRecord.parse(verdict.reply).header.rcode == RCODE.FORMERR


def test_other_opcodes_and_zone_transfers_get_notimp() -> None:
    r = resolver()
    record = DNSRecord.question("a.test")
    record.header.opcode = 2  # STATUS
    verdict = r.handle(bytes(record.pack()), 0.0)
    assert isinstance(verdict, Refuse) and verdict.reply is not None
    assert DNSRecord.parse(verdict.reply).header.rcode == RCODE.NOTIMP
    verdict = r.handle(query("example.test", "AXFR"), 0.0)
    assert isinstance(verdict, Refuse) and verdict.reply is not None
    assert DNSRecord.parse(verdict.reply).header.rcode == RCODE.NOTIMP
    assert (r.counters["notimp"], r.counters["formerr"]) == (2, 0)


def test_rfc6891_s6_1_3_edns_version_above_0_gets_badvers_with_our_version() -> None:
    r = resolver()
    record = DNSRecord.question("a.test")
    record.header.id = 77
    record.add_ar(EDNS0(version=1, udp_len=4096))
    verdict = r.handle(bytes(record.pack()), 0.0)
    assert isinstance(verdict, Refuse) and verdict.reply is not None
    reply = DNSRecord.parse(verdict.reply)
    opt = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
    assert reply.header.id == 77 and reply.header.qr == 1
    assert len(opt) == 1
    # RCODE 16 = BADVERS: 4 bits in the header, the upper 8 in the OPT TTL; VERSION 0
    assert reply.header.rcode | (opt[0].ttl >> 24) << 4 == 16
    assert (opt[0].ttl >> 16) & 0xFF == 0
    assert str(reply.q.qname) == "a.test."
    assert r.counters["badvers"] == 1 and r.counters["formerr"] == 0
    # version 0 is served as usual
    assert isinstance(r.handle(query("a.test", edns=1232), 0.0), Ask)


# --- forward mode and the cache ----------------------------------------------------------------


def test_forward_mode_asks_upstream_then_answers_from_cache() -> None:
    r = resolver()
    verdict = r.handle(query("www.example.test", qid=1), 0.0)
    assert isinstance(verdict, Ask)
    answer = upstream_answer("www.example.test", "192.0.2.7", ttl=300)
    r.remember(verdict.query.key, answer, 0.0)
    first = r.resolved(verdict.query, answer)
    assert first.header.id == 1 and str(first.rr[0].rdata) == "192.0.2.7"
    second = reply_of(r.handle(query("www.example.test", qid=2), 100.5))
    assert second.header.id == 2
    assert str(second.rr[0].rdata) == "192.0.2.7"
    assert second.rr[0].ttl == 200  # decremented by the time in the cache
    assert (r.counters["cache_hits"], r.counters["cache_misses"]) == (1, 1)


def test_reply_keeps_the_clients_spelling_of_the_name() -> None:
    r = resolver()
    ask = r.handle(query("www.example.test"), 0.0)
    assert isinstance(ask, Ask)
    r.remember(ask.query.key, upstream_answer("www.example.test", "192.0.2.7"), 0.0)
    reply = reply_of(r.handle(query("WwW.ExAmPlE.tEsT"), 1.0))
    assert str(reply.q.qname) == "WwW.ExAmPlE.tEsT."  # 0x20 randomisation survives


def test_opt_record_only_for_clients_that_sent_one() -> None:
    r = resolver(hosts={"h.test": ["192.0.2.1"]})
    plain = reply_of(r.handle(query("h.test"), 0.0))
    assert not [rr for rr in plain.ar if rr.rtype == QTYPE.OPT]
    with_edns = reply_of(r.handle(query("h.test", edns=4096), 0.0))
    assert [rr.rtype for rr in with_edns.ar] == [QTYPE.OPT]


def test_no_answer_becomes_servfail_and_is_counted() -> None:
    r = resolver()
    ask = r.handle(query("down.test"), 0.0)
    assert isinstance(ask, Ask)
    reply = r.resolved(ask.query, None)
    assert reply.header.rcode == RCODE.SERVFAIL and reply.header.id == 4242
    assert r.counters["servfail"] == 1


def test_upstream_request_is_canonical_and_answers_are_checked() -> None:
    ask = resolver().handle(query("Mixed.Case.test", edns=512), 0.0)
    assert isinstance(ask, Ask)
    request = DNSRecord.parse(upstream_request(ask.query.key, 77))
    assert (request.header.id, request.header.rd) == (77, 1)
    assert str(request.q.qname) == "mixed.case.test."
    assert [rr.rclass for rr in request.ar if rr.rtype == QTYPE.OPT] == [1232]
    good = upstream_answer("mixed.case.test", "192.0.2.9")
    assert parse_answer(bytes(good.pack()), ask.query.key).rr
    other = upstream_answer("other.test", "192.0.2.9")
    with pytest.raises(Exception, match="another question"):
        parse_answer(bytes(other.pack()), ask.query.key)


def test_big_answer_is_truncated_for_a_small_udp_client() -> None:
    ask = resolver().handle(query("big.test", "TXT"), 0.0)
    assert isinstance(ask, Ask)
    answer = DNSRecord.question("big.test", "TXT").reply()
    for _ in range(4):
        answer.add_answer(RR("big.test", QTYPE.TXT, ttl=60, rdata=TXT("x" * 200)))
    reply = resolver().resolved(ask.query, answer)
    data, truncated = pack_for_udp(reply, ask.query.udp_limit(1452))
    assert truncated and len(data) <= CLASSIC_UDP_SIZE
    short = DNSRecord.parse(data)
    assert short.header.tc == 1 and not short.rr and str(short.q.qname) == "big.test."
    edns = resolver().handle(query("big.test", "TXT", edns=4096), 0.0)
    assert isinstance(edns, Ask)
    assert edns.query.udp_limit(1452) == 1452  # the TUN's room caps the client's offer
    data, truncated = pack_for_udp(resolver().resolved(edns.query, answer), 1452)
    assert not truncated and len(DNSRecord.parse(data).rr) == 4


# --- hosts ---------------------------------------------------------------------------------------


def test_hosts_entries_answer_a_and_aaaa_and_nodata_for_a_missing_family() -> None:
    r = resolver(hosts={"printer.lan": ["192.0.2.50"]})
    a = reply_of(r.handle(query("Printer.LAN"), 0.0))
    assert [str(rr.rdata) for rr in a.rr] == ["192.0.2.50"]
    aaaa = reply_of(r.handle(query("printer.lan", "AAAA"), 0.0))
    assert aaaa.header.rcode == RCODE.NOERROR and aaaa.rr == []
    assert isinstance(r.handle(query("printer.lan", "MX"), 0.0), Ask)
    assert r.counters["hosts_answers"] == 2


def test_hosts_win_over_fake_ip() -> None:
    r = resolver(fake=True, hosts={"printer.lan": ["192.0.2.50"]})
    assert str(reply_of(r.handle(query("printer.lan"), 0.0)).rr[0].rdata) == "192.0.2.50"


# --- fake-IP mode --------------------------------------------------------------------------------


def test_fake_ip_answers_a_and_aaaa_from_the_pools_with_a_short_ttl() -> None:
    r = resolver(fake=True)
    a = reply_of(r.handle(query("www.example.test"), 0.0))
    aaaa = reply_of(r.handle(query("www.example.test", "AAAA"), 0.0))
    v4, v6 = ip_address(str(a.rr[0].rdata)), ip_address(str(aaaa.rr[0].rdata))
    assert v4 == IPv4Address("198.18.128.1") and a.rr[0].ttl == 10
    assert v6 == IPv6Address("fd00:7f:f::1")
    assert r.is_fake(v4) and r.is_fake(v6)
    assert r.domain_for(v4, 1.0) == r.domain_for(v6, 1.0) == "www.example.test"
    assert r.counters["fake_answers"] == 2


def test_fake_ip_forwards_other_types_and_real_domains() -> None:
    r = resolver(fake=True)
    assert isinstance(r.handle(query("www.example.test", "MX"), 0.0), Ask)
    assert isinstance(r.handle(query("real.test"), 0.0), Ask)
    assert isinstance(r.handle(query("www.real.test", "AAAA"), 0.0), Ask)


def test_fake_ip_hides_address_hints_of_https_records() -> None:
    reply = reply_of(resolver(fake=True).handle(query("www.example.test", "HTTPS"), 0.0))
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []


def test_ptr_for_a_fake_address_is_answered_locally_with_its_name() -> None:
    r = resolver(fake=True)
    reply_of(r.handle(query("www.example.test"), 0.0))  # 198.18.128.1
    reply_of(r.handle(query("www.example.test", "AAAA"), 0.0))  # fd00:7f:f::1
    v4 = reply_of(r.handle(query("1.128.18.198.in-addr.arpa", "PTR"), 1.0))
    assert v4.header.rcode == RCODE.NOERROR
    assert [str(rr.rdata) for rr in v4.rr] == ["www.example.test."]
    assert v4.rr[0].rtype == QTYPE.PTR and v4.rr[0].ttl == 10
    reverse6 = ".".join(reversed(f"{int(IPv6Address('fd00:7f:f::1')):032x}")) + ".ip6.arpa"
    v6 = reply_of(r.handle(query(reverse6, "PTR"), 1.0))
    assert [str(rr.rdata) for rr in v6.rr] == ["www.example.test."]


def test_ptr_for_an_unassigned_fake_address_is_nxdomain_and_not_asked_upstream() -> None:
    r = resolver(fake=True)
    reply = reply_of(r.handle(query("2.128.18.198.in-addr.arpa", "PTR"), 0.0))
    assert reply.header.rcode == RCODE.NXDOMAIN and reply.rr == []
    # an address outside the pools, or a zone rather than an address, still goes upstream
    assert isinstance(r.handle(query("1.2.0.192.in-addr.arpa", "PTR"), 0.0), Ask)
    assert isinstance(r.handle(query("128.18.198.in-addr.arpa", "PTR"), 0.0), Ask)
    assert isinstance(r.handle(query("x.128.18.198.in-addr.arpa", "PTR"), 0.0), Ask)


def test_exhausted_pool_gives_servfail() -> None:
    r = resolver(fake=True)  # the IPv4 pool has 2 addresses
    reply_of(r.handle(query("a.test"), 0.0))
    reply_of(r.handle(query("b.test"), 0.0))
    reply = reply_of(r.handle(query("c.test"), 1.0))
    assert reply.header.rcode == RCODE.SERVFAIL
    assert r.counters["fake_exhausted"] == 1


def test_domain_for_real_answers_in_forward_mode() -> None:
    r = resolver()
    ask = r.handle(query("www.example.test"), 0.0)
    assert isinstance(ask, Ask)
    r.remember(ask.query.key, upstream_answer("www.example.test", "192.0.2.7"), 0.0)
    assert r.domain_for(IPv4Address("192.0.2.7"), 1.0) == "www.example.test"
    assert r.domain_for(IPv4Address("192.0.2.8"), 1.0) is None
    assert not r.is_fake(IPv4Address("198.18.128.1"))  # forward mode has no pool


# --- names and URLs ------------------------------------------------------------------------------


def test_domain_set_matches_the_name_and_below() -> None:
    domains = DomainSet(["example.com", "*.corp.test", ".lan"])
    assert "example.com" in domains and "a.b.Example.COM." in domains
    assert "notexample.com" not in domains
    assert "x.corp.test" in domains and "corp.test" in domains
    assert "printer.lan" in domains


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp://9.9.9.9", "tcp://9.9.9.9:53"),
        ("udp://[2620:fe::fe]:5353", "udp://[2620:fe::fe]:5353"),
        ("https://dns.example/dns-query", "https://dns.example:443/dns-query"),
        ("https://dns.example", "https://dns.example:443/dns-query"),
        ("direct://192.0.2.53", "direct://192.0.2.53:53"),
    ],
)
def test_upstream_urls(text: str, expected: str) -> None:
    assert str(parse_upstream(text)) == expected


@pytest.mark.parametrize(
    "text",
    ["9.9.9.9", "tcp://dns.example", "ftp://1.2.3.4", "tcp://1.2.3.4:99999", "tcp://u@1.2.3.4"],
)
def test_bad_upstream_urls(text: str) -> None:
    with pytest.raises(ValueError):
        parse_upstream(text)


def test_pure_dns_modules_import_no_io() -> None:
    folder = Path(tun2socks_dns.__file__).parent
    offenders = {
        name: sorted(imported_modules(folder / f"{name}.py") & FORBIDDEN_IMPORTS)
        for name in PURE_MODULES
        if imported_modules(folder / f"{name}.py") & FORBIDDEN_IMPORTS
    }
    assert offenders == {}
    assert {"asyncio", "socket"} <= imported_modules(folder / "upstreams.py")  # the scan works
