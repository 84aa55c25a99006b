"""The Internet checksum (RFC 1071) without a per-byte Python loop.

Theory: a big-endian integer built from the data is congruent, modulo 0xFFFF, to the sum
of its 16-bit words, because 2**16 == 1 (mod 0xFFFF).  `int.from_bytes` and `%` both run
in C, so a 64 KiB segment costs a few microseconds.  The only difference from a real
one's complement sum is that a non-zero sum that is a multiple of 0xFFFF must read as
0xFFFF ("negative zero"), not 0.
"""

from __future__ import annotations

ZERO_CHECKSUM_UDP = 0xFFFF  # RFC 768: a computed 0 is sent as all ones; 0 means "none"


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The folded 16-bit one's complement sum of `data` plus `initial` (not inverted)."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8  # pad an odd length with one zero byte
    total = value % 0xFFFF
    if total == 0 and value:
        total = 0xFFFF
    total += initial
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def fold(total: int) -> int:
    """Fold a sum of 16-bit words into 16 bits with end-around carry."""
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of `data`: the inverted one's complement sum."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Sum of the IPv4 (RFC 9293 3.1) or IPv6 (RFC 8200 8.1) pseudo-header, not inverted."""
    return ones_sum(src + dst, protocol + (length >> 16) + (length & 0xFFFF))
