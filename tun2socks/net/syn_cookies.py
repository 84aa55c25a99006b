"""SYN cookies (RFC 4987 section 3.6): a handshake that completes without state held for it.

Over the half-open cap the stack answers SYNs from a bounded SYN cache. When a flood fills
that cache, the oldest entry goes to make room; a real client among them must not be lost
with it. So the SYN-ACK of every cached entry carries a cookie as its ISN: a keyed hash of
the 4-tuple, the client's ISN and a coarse clock, plus what the connection must remember of
the client's SYN (MSS, window scale, SACK-permitted). A client whose ACK arrives after its
entry was evicted echoes the cookie + 1, and the flow is rebuilt from it as if the entry had
been there.

Layout (32 bits): 24 bits of hash | SACK-permitted (1) | MSS index (3) | window scale (4; 15
when the SYN had none). A cookie is good for one to two clock periods of 64 s, as Linux's.
Pure: the secret and the time are arguments.
"""

from __future__ import annotations

import hashlib

from tun2socks.net.tcp import TcpOptions

PERIOD = 64.0  # seconds per clock tick; a cookie is checked against this tick and the last
# The client's MSS is rounded down to one of these (it is never sent bigger segments than it
# asked for); 48 is the floor Linux clamps a peer's MSS to.
MSS_TABLE = (48, 536, 1220, 1280, 1360, 1440, 1460, 8960)
NO_WSCALE = 15
DEFAULT_MSS = {4: 536, 6: 1220}  # RFC 9293 3.7.1, RFC 8200 section 5: when the SYN had none

FlowKey = tuple[bytes, int, bytes, int]  # client address, client port, server address, port


class SynCookies:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def make(self, key: FlowKey, irs: int, options: TcpOptions, version: int, now: float) -> int:
        """The ISN of our SYN-ACK for the SYN from ``key`` with sequence number ``irs``."""
        mss = options.mss if options.mss is not None else DEFAULT_MSS[version]
        index = max(i for i, value in enumerate(MSS_TABLE) if value <= mss or i == 0)
        wscale = NO_WSCALE if options.wscale is None else min(options.wscale, 14)
        low = int(options.sack_permitted) << 7 | index << 4 | wscale
        return self._hash(key, irs, int(now // PERIOD), low) << 8 | low

    def check(self, key: FlowKey, irs: int, cookie: int, now: float) -> TcpOptions | None:
        """The options of the SYN that ``cookie`` answered, or None if it is not our cookie."""
        low = cookie & 0xFF
        tick = int(now // PERIOD)
        if all(self._hash(key, irs, t, low) != cookie >> 8 for t in (tick, tick - 1)):
            return None
        wscale = low & 0x0F
        return TcpOptions(
            mss=MSS_TABLE[low >> 4 & 0x07],
            wscale=None if wscale == NO_WSCALE else wscale,
            sack_permitted=bool(low & 0x80),
        )

    def _hash(self, key: FlowKey, irs: int, tick: int, low: int) -> int:
        src, src_port, dst, dst_port = key
        digest = hashlib.blake2b(digest_size=3, key=self._secret)
        digest.update(bytes(src) + bytes(dst))
        digest.update(
            src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big") + irs.to_bytes(4, "big")
        )
        digest.update(tick.to_bytes(8, "big", signed=True) + bytes((low,)))
        return int.from_bytes(digest.digest(), "big")
