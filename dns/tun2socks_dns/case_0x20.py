"""0x20 case randomisation of upstream questions (draft-vixie-dnsext-dns0x20); pure, no I/O.

Over an upstream path whose source port does not change (one SOCKS5 UDP association serves
every query), the 16-bit ID would be the only secret an off-path spoofer must guess. Each
letter of the question name is sent in a random case; resolvers copy the question into the
answer as they got it (RFC 1035 section 7.3 asks them to keep the case), so an answer whose
question is not spelled exactly as ours is forged or stale and is ignored. A name with n
letters adds n bits to guess.

Names are compared as wire bytes: the first name of a message is never compressed.
"""

from __future__ import annotations

from collections.abc import Callable

HEADER_SIZE = 12  # RFC 1035 section 4.1.1
_MAX_NAME = 255  # RFC 1035 section 2.3.4


def question_name(message: bytes) -> bytes | None:
    """The wire bytes of the first question's name, or None when there is no plain name."""
    offset = HEADER_SIZE
    end = min(len(message), HEADER_SIZE + _MAX_NAME)
    while offset < end:
        length = message[offset]
        if length == 0:
            return message[HEADER_SIZE : offset + 1]
        if length & 0xC0:  # a pointer or an extended label type: not a name we wrote
            return None
        offset += 1 + length
    return None


def randomize_case(message: bytes, random_bits: Callable[[int], int]) -> bytes:
    """``message`` with each ASCII letter of its question name in a random case."""
    name = question_name(message)
    if name is None:
        return message
    letters = [i for i, byte in enumerate(name) if 0x41 <= byte & 0xDF <= 0x5A]  # A-Z, a-z
    if not letters:
        return message
    bits = random_bits(len(letters))
    spelled = bytearray(name)
    for bit, index in enumerate(letters):
        if bits >> bit & 1:
            spelled[index] ^= 0x20
    return message[:HEADER_SIZE] + bytes(spelled) + message[HEADER_SIZE + len(name) :]


def same_question(request: bytes, answer: bytes) -> bool:
    """Whether ``answer`` spells its question name exactly as ``request`` did."""
    name = question_name(request)
    return name is not None and answer[HEADER_SIZE : HEADER_SIZE + len(name)] == name
