"""atheris harness: the SOCKS5 server messages we parse (tun2socks/outbound/socks5_wire.py).

Checked for any bytes: the parsers raise only Socks5WireError (or ValueError for a wrong-sized
fixed message, which is our misuse and never happens with the sizes used here); a driver that
reads up to `reply_bytes_missing` bytes at a time never reads past the reply and ends with
the same reply as parsing the whole buffer; a parsed reply or UDP header builds back to the
same bytes when the address is in canonical form.

Run from the repository root (see README.md):
    PYTHONPATH=.:dns python3 -m tests.fuzz.fuzz_socks5_reply -atheris_runs=1000000
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports(include=["tun2socks"]):
    from tun2socks.outbound import socks5_wire as wire


def _incremental(data: bytes) -> wire.Reply | None:
    """Feed `data` as a driver would: read what reply_bytes_missing asks for, no more."""
    have = b""
    for _ in range(300):
        missing = wire.reply_bytes_missing(have)
        if missing == 0:
            return wire.parse_reply(have)
        got = data[: len(have) + missing]  # a read returns what is there, up to `missing`
        if len(got) == len(have):
            return None  # the server would still owe bytes
        have = got
    raise AssertionError("reply_bytes_missing never reached 0")


def test_one_input(data: bytes) -> None:
    try:
        whole = wire.parse_reply(data)
    except wire.Socks5WireError:
        whole = None
        failed = True
    else:
        failed = False
    try:
        step = _incremental(data)
    except wire.Socks5WireError:
        assert failed or whole is None, "incremental parse failed where a whole parse did not"
        step = None
    if whole is not None:
        assert step == whole, (step, whole)
        assert whole.bytes_consumed <= len(data)
    if len(data) >= 2:
        for parse in (wire.parse_method_selection, wire.parse_auth_reply):
            with contextlib.suppress(wire.Socks5WireError):
                parse(data[:2])
    try:
        host, port, payload = wire.parse_udp_datagram(data)
    except wire.Socks5WireError:
        return
    assert 0 <= port <= 0xFFFF
    header_len = len(data) - len(payload)
    try:
        rebuilt = wire.build_udp_datagram(host, port, payload)
    except ValueError:
        return  # e.g. a domain that is an IP literal in disguise: not canonical
    if rebuilt[:header_len] == data[:header_len]:
        assert rebuilt == data


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
