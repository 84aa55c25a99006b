"""DNS messages for the forwarder: parse a client's query, build replies for it; pure, no I/O.

Theory of operation: a client's bytes become a ``Query`` (or ``BadQuery`` saying whether a
FORMERR/NOTIMP reply is possible or the bytes must be dropped). Upstreams are always asked a
canonical question that we build (``upstream_request``: one question, RD, EDNS0 without DO),
so that one answer can serve the cache and every client that asked the same question.
``client_reply`` then shapes an answer for one client: its ID, its question as it wrote it
(0x20 case randomisation survives), TTLs reduced by the time spent in the cache, an OPT record
only if the client sent one (RFC 6891 section 7), and truncation (TC) when a UDP client's
buffer is too small, so that it retries over TCP (RFC 1035 section 4.2.1, RFC 7766).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from dnslib import AAAA as AAAA_RDATA
from dnslib import CLASS, EDNS0, PTR, QTYPE, RCODE, RR, DNSError, DNSHeader, DNSQuestion, DNSRecord
from dnslib import A as A_RDATA

HEADER_SIZE = 12  # RFC 1035 section 4.1.1
MAX_NAME_TEXT = 253  # RFC 1035 section 2.3.4: 255 octets on the wire, 253 as dotted text
CLASSIC_UDP_SIZE = 512  # RFC 1035 section 2.3.4
EDNS_UDP_SIZE = 1232  # the DNS flag day 2020 value: no IP fragmentation on common paths
MAX_TCP_MESSAGE = 0xFFFF  # RFC 1035 section 4.2.2: two-byte length prefix

TYPE_A = QTYPE.A
TYPE_AAAA = QTYPE.AAAA
TYPE_OPT = QTYPE.OPT
TYPE_SOA = QTYPE.SOA
TYPE_CNAME = QTYPE.CNAME
TYPE_ANY = QTYPE.ANY
TYPE_PTR = QTYPE.PTR
ZONE_TRANSFERS = frozenset({QTYPE.AXFR, QTYPE.IXFR})
CLASS_IN = CLASS.IN

NOERROR = RCODE.NOERROR
FORMERR = RCODE.FORMERR
SERVFAIL = RCODE.SERVFAIL
NXDOMAIN = RCODE.NXDOMAIN
NOTIMP = RCODE.NOTIMP
REFUSED = RCODE.REFUSED

# (name labels lower-cased, qtype, qclass): the identity of a question, for cache and coalescing
QuestionKey = tuple[tuple[bytes, ...], int, int]


NOT_IMPLEMENTED = frozenset({"opcode", "zone_transfer"})  # BadQuery reasons answered NOTIMP
EDNS_VERSION = 0  # the highest EDNS version we implement (RFC 6891 section 6.1.3)
BADVERS = 16  # RFC 6891 section 9: extended RCODE 1, header RCODE 0


class BadQuery(Exception):
    """A client's message that is not a query we can answer normally.

    ``reply`` is the error reply to send (FORMERR, NOTIMP), or None when the bytes must be
    dropped (too short for a header, or a response rather than a query: answering those could
    make us a reflector). ``reason`` is a short label for counters and debug logs.
    """

    def __init__(self, reason: str, reply: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


@dataclass(frozen=True)
class Query:
    """One client question, as the client wrote it."""

    id: int
    question: DNSQuestion
    key: QuestionKey
    rd: int
    cd: int
    edns_size: int | None  # the client's UDP payload size, None when it sent no OPT record

    @property
    def qtype(self) -> int:
        return int(self.question.qtype)

    @property
    def domain(self) -> str | None:
        """The name as ASCII text without the final dot, when it is an ordinary host name."""
        return domain_text(self.key[0])

    def udp_limit(self, ceiling: int) -> int:
        """The largest UDP reply this client takes, at most ``ceiling`` (the TUN's room)."""
        size = CLASSIC_UDP_SIZE if self.edns_size is None else max(self.edns_size, CLASSIC_UDP_SIZE)
        return max(CLASSIC_UDP_SIZE, min(size, ceiling))


def domain_text(labels: tuple[bytes, ...]) -> str | None:
    """``("www", "example", "com")`` as ``www.example.com``; None for the root or odd bytes."""
    if not labels:
        return None
    for label in labels:
        if not label or any(b <= 0x20 or b >= 0x7F or b == 0x2E for b in label):
            return None
    return b".".join(labels).decode("ascii")


def reverse_address(labels: tuple[bytes, ...]) -> IPv4Address | IPv6Address | None:
    """The address a whole reverse name stands for (RFC 1035 section 3.5, RFC 3596 section
    2.5): ``4.3.2.1.in-addr.arpa`` is 1.2.3.4; None for any other name (a zone cut included)."""
    lower = tuple(label.lower() for label in labels)
    try:
        if lower[-2:] == (b"in-addr", b"arpa") and len(lower) == 6:
            octets = [int(label) for label in reversed(lower[:4])]
            if all(label.isdigit() and len(label) <= 3 for label in lower[:4]):
                return IPv4Address(bytes(octets))
        elif lower[-2:] == (b"ip6", b"arpa") and len(lower) == 34:
            nibbles = b"".join(reversed(lower[:32]))
            if all(len(label) == 1 for label in lower[:32]):
                return IPv6Address(int(nibbles, 16))
    except ValueError:  # a label that is no number, an octet over 255
        return None
    return None


def question_key(question: DNSQuestion) -> QuestionKey:
    labels = tuple(label.lower() for label in question.qname.label)
    return labels, int(question.qtype), int(question.qclass)


def parse_query(data: bytes) -> Query:
    """A client's query; raises BadQuery."""
    if len(data) < HEADER_SIZE:
        raise BadQuery("short")
    if data[2] & 0x80:  # QR set: a response sent to us
        raise BadQuery("not_a_query")
    try:
        record = DNSRecord.parse(data)
    except Exception as exc:  # dnslib raises more than DNSError on hostile bytes
        raise BadQuery("malformed", _header_error(data, FORMERR)) from exc
    header = record.header
    if header.opcode != 0:  # only QUERY (RFC 1035 section 4.1.1)
        raise BadQuery("opcode", _header_error(data, NOTIMP))
    if len(record.questions) != 1:  # RFC 9619: exactly one question
        raise BadQuery("question_count", _header_error(data, FORMERR))
    question = record.questions[0]
    # dnslib reads longer names but refuses to write them: every reply would fail to pack.
    if len(question.qname) > MAX_NAME_TEXT:
        raise BadQuery("long_name", _header_error(data, FORMERR))
    if question.qtype in ZONE_TRANSFERS:
        raise BadQuery("zone_transfer", error_reply_for(record, NOTIMP))
    edns_size = None
    for rr in record.ar:
        if rr.rtype == TYPE_OPT:
            edns_size = int(rr.rclass)
            if (int(rr.ttl) >> 16) & 0xFF > EDNS_VERSION:  # the VERSION byte of the OPT TTL
                raise BadQuery("badvers", _badvers_reply(record))
    return Query(
        id=header.id,
        question=question,
        key=question_key(question),
        rd=header.rd,
        cd=header.cd,
        edns_size=edns_size,
    )


def _header_error(data: bytes, rcode: int) -> bytes:
    """A reply made of the query's header only: for messages we cannot parse further."""
    flags = int.from_bytes(data[2:4], "big")
    opcode_rd = flags & 0x7900  # keep OPCODE and RD
    reply_flags = 0x8000 | opcode_rd | 0x0080 | rcode  # QR, RA, RCODE
    return data[:2] + reply_flags.to_bytes(2, "big") + bytes(8)


def _badvers_reply(record: DNSRecord) -> bytes:
    """RFC 6891 section 6.1.3: BADVERS, with an OPT record carrying the version we do speak."""
    reply = DNSRecord(DNSHeader(id=record.header.id, qr=1, ra=1, rd=record.header.rd))
    reply.questions = list(record.questions[:1])
    reply.header.rcode = BADVERS & 0xF
    reply.add_ar(EDNS0(ext_rcode=BADVERS >> 4, version=EDNS_VERSION, udp_len=EDNS_UDP_SIZE))
    return bytes(reply.pack())


def error_reply_for(record: DNSRecord, rcode: int) -> bytes:
    reply = DNSRecord(DNSHeader(id=record.header.id, qr=1, ra=1, rd=record.header.rd))
    reply.header.rcode = rcode
    reply.questions = list(record.questions[:1])
    return bytes(reply.pack())


def error_reply(query: Query, rcode: int) -> bytes:
    reply = DNSRecord(DNSHeader(id=query.id, qr=1, ra=1, rd=query.rd), q=query.question)
    reply.header.rcode = rcode
    if query.edns_size is not None:
        reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
    return bytes(reply.pack())


def upstream_request(key: QuestionKey, request_id: int) -> bytes:
    """The canonical question for upstreams: one question, RD=1, EDNS0 (no DO bit)."""
    labels, qtype, qclass = key
    record = DNSRecord(DNSHeader(id=request_id, rd=1), q=DNSQuestion(labels, qtype, qclass))
    record.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
    return bytes(record.pack())


def parse_answer(data: bytes, key: QuestionKey) -> DNSRecord:
    """An upstream's answer to ``key``; DNSError when it is not one."""
    try:
        record = DNSRecord.parse(data)
    except DNSError:
        raise
    except Exception as exc:  # dnslib raises more than DNSError on hostile bytes
        raise DNSError(f"unparsable answer: {exc}") from None
    if not record.header.qr:
        raise DNSError("upstream sent a query, not an answer")
    if len(record.questions) != 1 or question_key(record.questions[0]) != key:
        raise DNSError("answer is for another question")
    try:  # dnslib reads what it cannot write (names over 255 octets): we could not pass it on
        record.pack()
    except Exception as exc:
        raise DNSError(f"answer cannot be passed on: {type(exc).__name__}") from None
    return record


def is_good_answer(record: DNSRecord) -> bool:
    """An answer worth giving: data or a definite no. SERVFAIL/REFUSED mean: ask another."""
    return bool(record.header.rcode in (NOERROR, NXDOMAIN) and not record.header.tc)


def local_answer(
    query: Query, addresses: list[IPv4Address | IPv6Address], ttl: int, *, rcode: int = NOERROR
) -> DNSRecord:
    """An answer we make ourselves (hosts entries, fake IPs): A/AAAA records for ``query``."""
    record = DNSRecord(DNSHeader(qr=1, aa=int(rcode == NOERROR), ra=1), q=query.question)
    record.header.rcode = rcode
    for address in addresses:
        if address.version == 4:
            rdata, rtype = A_RDATA(str(address)), TYPE_A
        else:
            rdata, rtype = AAAA_RDATA(str(address)), TYPE_AAAA
        record.add_answer(RR(query.question.qname, rtype, CLASS_IN, ttl, rdata))
    return record


def ptr_answer(query: Query, name: str | None, ttl: int) -> DNSRecord:
    """A PTR answer we make ourselves (fake addresses): the name, or NXDOMAIN without one."""
    record = DNSRecord(DNSHeader(qr=1, aa=1, ra=1), q=query.question)
    if name is None:
        record.header.rcode = NXDOMAIN
    else:
        record.add_answer(RR(query.question.qname, TYPE_PTR, CLASS_IN, ttl, PTR(name + ".")))
    return record


def client_reply(query: Query, answer: DNSRecord, *, elapsed: int = 0) -> DNSRecord:
    """``answer`` shaped for the client that sent ``query``; TTLs reduced by ``elapsed`` s."""
    header = DNSHeader(
        id=query.id,
        qr=1,
        aa=answer.header.aa,
        rd=query.rd,
        ra=1,
        ad=answer.header.ad,
        cd=query.cd,
    )
    header.rcode = answer.header.rcode
    reply = DNSRecord(header, q=query.question)
    reply.rr = [_aged(rr, elapsed) for rr in answer.rr]
    reply.auth = [_aged(rr, elapsed) for rr in answer.auth]
    reply.ar = [_aged(rr, elapsed) for rr in answer.ar if rr.rtype != TYPE_OPT]
    if query.edns_size is not None:
        reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
    return reply


def _aged(rr: RR, elapsed: int) -> RR:
    if not elapsed:
        return rr
    return RR(rr.rname, rr.rtype, rr.rclass, max(0, rr.ttl - elapsed), rr.rdata)


def pack_for_udp(reply: DNSRecord, limit: int) -> tuple[bytes, bool]:
    """The bytes of ``reply`` for a UDP client, and whether they had to be truncated.

    Too big: the header and question only, with TC set (RFC 2181 section 9: no partial RRsets),
    and the OPT record if the client sent one.
    """
    data = bytes(reply.pack())
    if len(data) <= limit:
        return data, False
    header = DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap)
    header.tc = 1
    short = DNSRecord(header, questions=list(reply.questions))
    short.ar = [rr for rr in reply.ar if rr.rtype == TYPE_OPT]
    return bytes(short.pack()), True


def pack_for_tcp(reply: DNSRecord) -> bytes:
    data = bytes(reply.pack())
    if len(data) > MAX_TCP_MESSAGE:  # cannot be framed: send what a UDP client would get
        data, _ = pack_for_udp(reply, MAX_TCP_MESSAGE)
    return data
