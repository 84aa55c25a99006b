"""The answer cache: TTL-honouring, negative answers included, bounded, LRU; pure, no I/O.

Theory of operation: ``put(key, answer, now)`` decides whether and for how long an upstream
answer may be kept, and keeps a copy whose record TTLs are already clamped; ``get(key, now)``
gives that copy back with the whole seconds it spent here, so that the reply to the client
can count its TTLs down (``message.client_reply``). Time is an argument: the tests step it.

- Positive answers live for the smallest TTL among their records, each clamped to
  ``[min_ttl, max_ttl]`` first.
- Negative answers (NXDOMAIN, or NOERROR without a record of the asked type: "NODATA", also
  at the end of a CNAME chain) live for ``min(SOA TTL, SOA MINIMUM)`` capped at
  ``negative_ttl`` (RFC 2308 section 5), and no longer than the chain's records. Without an
  SOA in the authority section RFC 2308 says not to cache them, and we do not.
- Anything else (SERVFAIL, REFUSED, truncated answers) is never cached.
- At most ``size`` entries: the least recently used goes first; ``size`` 0 disables the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from dnslib import RR, DNSRecord

from .message import NOERROR, NXDOMAIN, TYPE_ANY, TYPE_CNAME, TYPE_OPT, TYPE_SOA, QuestionKey

_TtlMap = Callable[[int], int]


@dataclass(frozen=True)
class CacheSettings:
    size: int = 4096
    min_ttl: int = 0
    max_ttl: int = 86400
    negative_ttl: int = 300


@dataclass
class _Entry:
    answer: DNSRecord
    stored: float
    expires: float


class DnsCache:
    def __init__(self, settings: CacheSettings) -> None:
        if settings.min_ttl > settings.max_ttl:
            raise ValueError("min_ttl must not exceed max_ttl")
        self.settings = settings
        self._entries: OrderedDict[QuestionKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: QuestionKey, now: float) -> tuple[DNSRecord, int] | None:
        """The cached answer and the whole seconds since it was stored, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.answer, int(now - entry.stored)

    def put(self, key: QuestionKey, answer: DNSRecord, now: float) -> int | None:
        """Keep ``answer`` if it may be cached; the seconds it will be kept, or None."""
        if self.settings.size <= 0 or answer.header.tc:
            return None
        rcode = answer.header.rcode
        if rcode == NOERROR and _answers(answer, key[1]):
            stored, ttl = self._positive(answer)
        elif rcode in (NOERROR, NXDOMAIN):
            negative = self._negative(answer)
            if negative is None:
                return None
            stored, ttl = negative
        else:
            return None
        if ttl <= 0:
            return None
        self._entries[key] = _Entry(stored, now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.settings.size:
            self._entries.popitem(last=False)
        return ttl

    def _clamp(self, ttl: int) -> int:
        return min(max(ttl, self.settings.min_ttl), self.settings.max_ttl)

    def _positive(self, answer: DNSRecord) -> tuple[DNSRecord, int]:
        copy = _copy(answer, self._clamp)
        ttls = [rr.ttl for rr in (*copy.rr, *copy.auth) if rr.rtype != TYPE_OPT]
        return copy, min(ttls)

    def _negative(self, answer: DNSRecord) -> tuple[DNSRecord, int] | None:
        soas = [rr for rr in answer.auth if rr.rtype == TYPE_SOA]
        if not soas:
            return None
        soa = soas[0]
        minimum = int(soa.rdata.times[4])
        ttl = min(int(soa.ttl), minimum, self.settings.negative_ttl)
        # A CNAME chain before the "no" (RFC 2308 sections 2.1, 2.2) is cached with it: the
        # entry must not outlive the chain's own records.
        chain = [self._clamp(int(rr.ttl)) for rr in answer.rr if rr.rtype != TYPE_OPT]
        ttl = min([ttl, *chain])
        return _copy(answer, lambda rr_ttl: min(rr_ttl, ttl)), ttl


def _answers(answer: DNSRecord, qtype: int) -> bool:
    """Whether the answer section holds a record of the asked type (an answer, not NODATA).

    A CNAME chain alone is NODATA when its target has no such record (RFC 2308 section 2.2);
    an OPT record belongs in the additional section only (RFC 6891 section 6.1.1).
    """
    if qtype == TYPE_ANY:
        return any(rr.rtype != TYPE_OPT for rr in answer.rr)
    return any(rr.rtype == qtype for rr in answer.rr) or (qtype == TYPE_CNAME and bool(answer.rr))


def _copy(answer: DNSRecord, ttl_of: _TtlMap) -> DNSRecord:
    """A copy with each record's TTL mapped: the upstream's record objects stay untouched."""
    copy = DNSRecord(answer.header, questions=list(answer.questions))
    copy.rr = [_with_ttl(rr, ttl_of) for rr in answer.rr]
    copy.auth = [_with_ttl(rr, ttl_of) for rr in answer.auth]
    copy.ar = [_with_ttl(rr, ttl_of) for rr in answer.ar if rr.rtype != TYPE_OPT]
    return copy


def _with_ttl(rr: RR, ttl_of: _TtlMap) -> RR:
    return RR(rr.rname, rr.rtype, rr.rclass, ttl_of(int(rr.ttl)), rr.rdata)
