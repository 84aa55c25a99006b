"""The DNS answer cache: TTLs with clamps, negative answers (RFC 2308), LRU bound; stepped clock."""

from __future__ import annotations

from dnslib import CNAME, QTYPE, RCODE, RR, SOA, A, DNSRecord

from tun2socks_dns.cache import CacheSettings, DnsCache
from tun2socks_dns.message import client_reply, parse_query, question_key

NAME = "www.example.test"


def key(name: str = NAME, qtype: str = "A") -> tuple[tuple[bytes, ...], int, int]:
    return question_key(DNSRecord.question(name, qtype).q)


def answer(name: str = NAME, *ttls: int, rcode: int = RCODE.NOERROR) -> DNSRecord:
    record = DNSRecord.question(name).reply()
    record.header.rcode = rcode
    for number, ttl in enumerate(ttls or (300,)):
        record.add_answer(RR(name, QTYPE.A, ttl=ttl, rdata=A(f"192.0.2.{number + 1}")))
    return record


def negative(
    name: str = NAME, *, soa_ttl: int = 900, minimum: int = 60, rcode: int = RCODE.NXDOMAIN
) -> DNSRecord:
    record = DNSRecord.question(name).reply()
    record.header.rcode = rcode
    soa = SOA("ns.example.test", "admin.example.test", (1, 3600, 600, 86400, minimum))
    record.add_auth(RR("example.test", QTYPE.SOA, ttl=soa_ttl, rdata=soa))
    return record


def cache(**settings: int) -> DnsCache:
    return DnsCache(CacheSettings(**settings))


def test_miss_then_hit_until_the_ttl_runs_out() -> None:
    c = cache()
    assert c.get(key(), 0.0) is None
    assert c.put(key(), answer(NAME, 300), 100.0) == 300
    assert c.get(key(), 100.0) is not None
    assert c.get(key(), 399.9) is not None
    assert c.get(key(), 400.0) is None
    assert len(c) == 0  # the expired entry is gone


def test_hit_reports_whole_seconds_elapsed_for_ttl_decrement() -> None:
    c = cache()
    c.put(key(), answer(NAME, 300), 10.0)
    hit = c.get(key(), 47.9)
    assert hit is not None
    stored, elapsed = hit
    assert elapsed == 37
    query = parse_query(bytes(DNSRecord.question(NAME).pack()))
    reply = client_reply(query, stored, elapsed=elapsed)
    assert [rr.ttl for rr in reply.rr] == [263]
    assert reply.header.id == query.id


def test_entry_lives_for_the_smallest_ttl() -> None:
    c = cache()
    assert c.put(key(), answer(NAME, 300, 30, 600), 0.0) == 30
    assert c.get(key(), 29.0) is not None
    assert c.get(key(), 30.0) is None


def test_ttls_are_clamped_to_min_and_max() -> None:
    c = cache(min_ttl=60, max_ttl=3600)
    assert c.put(key("low.test"), answer("low.test", 5), 0.0) == 60
    assert c.put(key("high.test"), answer("high.test", 86400), 0.0) == 3600
    hit = c.get(key("high.test"), 0.0)
    assert hit is not None and hit[0].rr[0].ttl == 3600  # the clamp shows in the answer too


def test_zero_ttl_is_not_cached() -> None:
    assert cache().put(key(), answer(NAME, 0), 0.0) is None


def test_key_is_case_insensitive_and_by_type() -> None:
    c = cache()
    c.put(key("WWW.Example.TEST"), answer(NAME, 300), 0.0)
    assert c.get(key("www.example.test"), 1.0) is not None
    assert c.get(key("www.example.test", "AAAA"), 1.0) is None


def test_nxdomain_cached_for_soa_minimum_capped_by_negative_ttl() -> None:
    c = cache(negative_ttl=300)
    assert c.put(key(), negative(soa_ttl=900, minimum=60), 0.0) == 60  # RFC 2308 section 5
    assert c.put(key("b.test"), negative("b.test", soa_ttl=30, minimum=600), 0.0) == 30
    assert c.put(key("c.test"), negative("c.test", soa_ttl=9000, minimum=9000), 0.0) == 300
    hit = c.get(key(), 10.0)
    assert hit is not None
    assert hit[0].header.rcode == RCODE.NXDOMAIN
    assert hit[0].auth[0].ttl == 60  # the SOA's TTL is the negative TTL


def test_nodata_is_cached_like_nxdomain() -> None:
    c = cache()
    assert c.put(key(), negative(rcode=RCODE.NOERROR, minimum=120), 0.0) == 120
    assert c.get(key(), 119.0) is not None
    assert c.get(key(), 120.0) is None


def cname_then_nodata(*, cname_ttl: int, soa_ttl: int, minimum: int) -> DNSRecord:
    """www -> alias.cdn.test, which has no AAAA: a CNAME in the answer, the SOA in authority."""
    record = DNSRecord.question(NAME, "AAAA").reply()
    record.add_answer(RR(NAME, QTYPE.CNAME, ttl=cname_ttl, rdata=CNAME("alias.cdn.test")))
    soa = SOA("ns.cdn.test", "admin.cdn.test", (1, 3600, 600, 86400, minimum))
    record.add_auth(RR("cdn.test", QTYPE.SOA, ttl=soa_ttl, rdata=soa))
    return record


def test_rfc2308_s5_nodata_after_cname_lives_for_soa_minimum_not_the_soa_ttl() -> None:
    c = cache()
    aaaa = key(NAME, "AAAA")
    assert c.put(aaaa, cname_then_nodata(cname_ttl=3600, soa_ttl=3600, minimum=60), 0.0) == 60
    assert c.get(aaaa, 59.0) is not None
    assert c.get(aaaa, 60.0) is None
    # bounded by the config's negative_ttl, and by the chain's own TTL
    bounded = cache(negative_ttl=30)
    assert bounded.put(aaaa, cname_then_nodata(cname_ttl=3600, soa_ttl=900, minimum=600), 0.0) == 30
    assert c.put(aaaa, cname_then_nodata(cname_ttl=20, soa_ttl=900, minimum=600), 0.0) == 20


def test_rfc2308_s5_cname_answer_to_a_cname_question_is_positive() -> None:
    c = cache()
    record = cname_then_nodata(cname_ttl=500, soa_ttl=3600, minimum=60)
    assert c.put(key(NAME, "CNAME"), record, 0.0) == 500


def test_negative_answer_without_soa_is_not_cached() -> None:
    record = DNSRecord.question(NAME).reply()
    record.header.rcode = RCODE.NXDOMAIN
    assert cache().put(key(), record, 0.0) is None


def test_servfail_refused_and_truncated_are_not_cached() -> None:
    c = cache()
    assert c.put(key(), answer(NAME, 300, rcode=RCODE.SERVFAIL), 0.0) is None
    assert c.put(key(), answer(NAME, 300, rcode=RCODE.REFUSED), 0.0) is None
    truncated = answer(NAME, 300)
    truncated.header.tc = 1
    assert c.put(key(), truncated, 0.0) is None
    assert len(c) == 0


def test_bounded_least_recently_used_goes_first() -> None:
    c = cache(size=2)
    c.put(key("a.test"), answer("a.test"), 0.0)
    c.put(key("b.test"), answer("b.test"), 0.0)
    assert c.get(key("a.test"), 1.0) is not None  # a is now the most recent
    c.put(key("c.test"), answer("c.test"), 2.0)
    assert len(c) == 2
    assert c.get(key("b.test"), 3.0) is None
    assert c.get(key("a.test"), 3.0) is not None
    assert c.get(key("c.test"), 3.0) is not None


def test_size_zero_disables_the_cache() -> None:
    c = cache(size=0)
    assert c.put(key(), answer(), 0.0) is None
    assert c.get(key(), 0.0) is None


def test_the_upstream_record_is_not_modified() -> None:
    original = answer(NAME, 5)
    cache(min_ttl=60).put(key(), original, 0.0)
    assert original.rr[0].ttl == 5
