"""Initial sequence numbers that an off-path attacker cannot predict (RFC 6528, RFC 9293 3.4.1).

ISN = M + F(local address, local port, remote address, remote port, secret), where M is
a clock ticking every 4 microseconds and F a keyed hash (BLAKE2s with a 128-bit key: a
pseudorandom function, as RFC 6528 3 asks).  Seeing the ISNs of some connections tells
nothing about another 4-tuple's, and on one 4-tuple they still grow with the clock, so a
new incarnation starts above the old one's sequence numbers (RFC 9293 3.4.1).
"""

from __future__ import annotations

import hashlib

TICKS_PER_SECOND = 250_000  # one per 4 microseconds (RFC 9293 3.4.1)


class IsnGenerator:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the ISN secret needs at least 128 bits")
        self._key = secret[:32]

    def isn(
        self, client: bytes, client_port: int, server: bytes, server_port: int, now: float
    ) -> int:
        """The ISN for our side of a connection; `now` in seconds from any fixed origin."""
        h = hashlib.blake2s(key=self._key, digest_size=4)
        h.update(server)
        h.update(client)
        h.update((server_port << 16 | client_port).to_bytes(4, "big"))
        return (int.from_bytes(h.digest(), "big") + int(now * TICKS_PER_SECOND)) & 0xFFFFFFFF
