"""Property-based fuzzing of the SOCKS5 server messages we parse (socks5_wire.py).

test_socks5_wire.py checks that any bytes parse or raise the wire error; these add the
driver's view: reading what `reply_bytes_missing` asks for never reads past a successful reply
and ends with the same reply as parsing everything at once, and UDP relay headers.
The same properties run for longer under atheris (tests/fuzz/fuzz_socks5_reply.py).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tun2socks.outbound import socks5_wire as wire

# Replies that start right: version 5, then anything (so that most draws reach the address).
replies = st.builds(lambda rest: b"\x05" + rest, st.binary(max_size=300)) | st.binary(max_size=40)


def read_like_a_driver(stream: bytes) -> tuple[wire.Reply | None, int]:
    """Read from `stream` what reply_bytes_missing asks for; the reply and bytes read."""
    have = b""
    for _ in range(10):
        missing = wire.reply_bytes_missing(have)
        if missing == 0:
            return wire.parse_reply(have), len(have)
        got = stream[: len(have) + missing]  # a read returns what is there, up to `missing`
        if len(got) == len(have):
            return None, len(have)
        have = got
    raise AssertionError("a reply needs at most three reads")


@settings(max_examples=1000, deadline=None)
@given(stream=replies, tail=st.binary(max_size=20))
def test_a_driver_never_reads_past_the_reply(stream: bytes, tail: bytes) -> None:
    try:
        whole = wire.parse_reply(stream)
    except wire.Socks5WireError:
        whole = None
    try:
        stepped, read = read_like_a_driver(stream + tail)
    except wire.Socks5WireError:
        assert whole is None
        return
    if whole is not None:
        assert stepped == whole
        if whole.reply_code == wire.ReplyCode.SUCCEEDED:
            assert read == whole.bytes_consumed  # the relayed stream after it stays in the socket
        else:  # after a failure the server closes: the 5-byte first read may pass a 4-byte reply
            assert read <= max(whole.bytes_consumed, 5)


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=300))
def test_udp_relay_headers_parse_or_raise_the_wire_error_only(data: bytes) -> None:
    try:
        host, port, payload = wire.parse_udp_datagram(data)
    except wire.Socks5WireError:
        return
    assert 0 <= port <= 0xFFFF
    assert bytes(payload) == data[len(data) - len(payload) :]
    assert host
