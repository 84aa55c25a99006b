"""The CONNECT reply at the head of a stream whose client data went right behind the request
(``outbound/connect_reply.py``): RFC 1928 section 6 sizes, exact, whatever the chunking."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tun2socks.outbound.connect_reply import ReplyFailed, ReplySplitter, ReplySucceeded
from tun2socks.outbound.socks5_wire import ReplyCode, build_reply

IPV4_REPLY = build_reply(ReplyCode.SUCCEEDED, "192.0.2.1", 1080)
IPV6_REPLY = build_reply(ReplyCode.SUCCEEDED, "2001:db8::1", 443)
DOMAIN_REPLY = build_reply(ReplyCode.SUCCEEDED, "proxy.example", 8080)
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


def feed_in_chunks(data: bytes, cuts: list[int]) -> ReplySucceeded | ReplyFailed:
    """Feed `data` cut at `cuts` until an outcome comes."""
    splitter = ReplySplitter()
    for start, end in itertools.pairwise([0, *sorted(set(cuts)), len(data)]):
        outcome = splitter.feed(data[start:end])
        if outcome is not None:
            return outcome
    raise AssertionError("no outcome")


@pytest.mark.parametrize(
    ("reply", "host", "port"),
    [
        (IPV4_REPLY, "192.0.2.1", 1080),
        (IPV6_REPLY, "2001:db8::1", 443),
        (DOMAIN_REPLY, "proxy.example", 8080),
    ],
)
def test_rfc1928_s6_success_reply_of_each_address_type_passes_the_bytes_after_it_on(
    reply: bytes, host: str, port: int
) -> None:
    outcome = ReplySplitter().feed(reply + ANSWER)
    assert outcome == ReplySucceeded(host, port, ANSWER)


def test_rfc1928_s6_reply_alone_leaves_no_rest() -> None:
    assert ReplySplitter().feed(IPV4_REPLY) == ReplySucceeded("192.0.2.1", 1080, b"")


def test_rfc1928_s6_reply_fed_byte_by_byte_is_incomplete_until_its_last_byte() -> None:
    splitter = ReplySplitter()
    for byte in DOMAIN_REPLY[:-1]:
        assert splitter.feed(bytes([byte])) is None
    assert splitter.received == len(DOMAIN_REPLY) - 1
    assert splitter.feed(DOMAIN_REPLY[-1:] + b"x") == ReplySucceeded("proxy.example", 8080, b"x")


@given(
    reply=st.sampled_from([IPV4_REPLY, IPV6_REPLY, DOMAIN_REPLY]),
    rest=st.binary(max_size=64),
    cuts=st.lists(st.integers(min_value=1, max_value=100), max_size=8),
)
def test_rfc1928_s6_reply_split_anywhere_yields_exactly_the_bytes_after_it(
    reply: bytes, rest: bytes, cuts: list[int]
) -> None:
    data = reply + rest
    outcome = feed_in_chunks(data, [c for c in cuts if c < len(data)])
    assert isinstance(outcome, ReplySucceeded)
    # The outcome comes with the chunk holding the reply's last byte: what that chunk had after
    # it is `rest`'s head, the chunks after it were never fed.
    consumed = len(reply) + len(outcome.rest)
    assert data[len(reply) : consumed] == outcome.rest
    assert rest.startswith(outcome.rest)


@pytest.mark.parametrize(
    ("code", "kind_text"),
    [
        (ReplyCode.CONNECTION_REFUSED, "refused"),
        (ReplyCode.HOST_UNREACHABLE, "unreachable"),
        (ReplyCode.CONNECTION_NOT_ALLOWED, "not allowed"),
    ],
)
def test_rfc1928_s6_failure_reply_is_a_failure_with_its_rep_code(
    code: ReplyCode, kind_text: str
) -> None:
    outcome = ReplySplitter().feed(build_reply(code, "0.0.0.0", 0) + b"trailing")
    assert isinstance(outcome, ReplyFailed)
    assert outcome.reply_code == code
    assert kind_text in outcome.reason
    assert not outcome.before_any_byte


def test_rfc1928_s6_failure_reply_with_atyp_0_reports_its_rep_code() -> None:
    outcome = ReplySplitter().feed(bytes([5, ReplyCode.CONNECTION_REFUSED, 0, 0]))
    assert isinstance(outcome, ReplyFailed)
    assert outcome.reply_code == ReplyCode.CONNECTION_REFUSED


@pytest.mark.parametrize(
    "garbage",
    [b"HTTP/1.1 400 Bad Request\r\n", bytes([4, 90, 0, 0, 0, 0, 0, 0]), bytes([5, 0, 0, 9])],
    ids=["http", "socks4", "unknown-atyp"],
)
def test_rfc1928_s6_bytes_that_are_no_reply_are_a_protocol_failure(garbage: bytes) -> None:
    outcome = ReplySplitter().feed(garbage)
    assert isinstance(outcome, ReplyFailed)
    assert outcome.reply_code is None
    assert "CONNECT reply" in outcome.reason
    assert not outcome.before_any_byte


def test_stream_ending_before_any_byte_marks_a_dead_session() -> None:
    outcome = ReplySplitter().ended()
    assert outcome.before_any_byte
    assert outcome.reply_code is None
    reset = ReplySplitter().ended("connection reset by peer")
    assert reset.before_any_byte
    assert "connection reset by peer" in reset.reason


def test_stream_ending_inside_the_reply_is_a_protocol_failure_not_a_dead_session() -> None:
    splitter = ReplySplitter()
    assert splitter.feed(IPV4_REPLY[:5]) is None
    outcome = splitter.ended()
    assert not outcome.before_any_byte
    assert outcome.reply_code is None
    assert "while waiting for the CONNECT reply" in outcome.reason


def test_rfc1928_s6_stream_ending_after_ver_and_a_failure_rep_reports_that_rep() -> None:
    splitter = ReplySplitter()
    assert splitter.feed(bytes([5, ReplyCode.NETWORK_UNREACHABLE])) is None
    outcome = splitter.ended()
    assert outcome.reply_code == ReplyCode.NETWORK_UNREACHABLE
    assert not outcome.before_any_byte
