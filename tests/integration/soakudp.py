"""UDP and DNS jobs for the soak (loadgen.py soak), run in the client namespace.

udp_echo_session: a new UDP socket (so a new session in tun2socks, a new UDP ASSOCIATE at the
proxy) that exchanges a few datagrams with the echo server, one of them larger than the MTU
(fragments both ways). UDP may lose a datagram on a busy machine: each is sent again, a few
times, before it counts as lost.

dns_udp / dns_tcp: one query to the resolver the client namespace uses (tun2socks's forwarder
answers it), checked against what the bed's dnsmasq serves.

Every wait is bounded; failures raise ValueError or TimeoutError (loadgen counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable

from dnslib import QTYPE, RCODE, DNSRecord

SIZES = (64, 1400, 3000)  # 3000: fragments at MTU 1500
TRIES = 4


def _socket(host: str, kind: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setblocking(False)
    return sock


async def _exchange(
    sock: socket.socket, payload: bytes, accept: Callable[[bytes], bool], timeout: float
) -> bytes:
    """Send `payload` until a datagram `accept` takes comes back (late replies are skipped)."""
    loop = asyncio.get_running_loop()
    for _ in range(TRIES):
        await loop.sock_sendall(sock, payload)
        deadline = time.monotonic() + timeout / TRIES
        with contextlib.suppress(TimeoutError):
            while True:
                left = deadline - time.monotonic()
                reply = await asyncio.wait_for(loop.sock_recv(sock, 65535), max(left, 0.01))
                if accept(reply):
                    return reply
    raise TimeoutError(f"no reply to {len(payload)} bytes after {TRIES} tries")


async def udp_echo_session(host: str, port: int, seed: int, timeout: float) -> float:
    """Echo SIZES through a new socket; the time of its last datagram (for the idle timer)."""
    rng = random.Random(seed)
    with _socket(host, socket.SOCK_DGRAM) as sock:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        for size in SIZES:
            payload = rng.randbytes(size)
            await _exchange(sock, payload, payload.__eq__, timeout)
    return time.monotonic()


def _query(name: str, qtype: str) -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    query.header.id = random.randrange(0x10000)
    return query


def _check(query: DNSRecord, data: bytes, expect: str | None) -> None:
    """`expect`: an address of an A record, "NXDOMAIN", or None for any TXT answer."""
    try:
        reply = DNSRecord.parse(data)
    except Exception as exc:  # dnslib raises several kinds on bad bytes
        raise ValueError(f"DNS reply does not parse: {exc}") from None
    if reply.header.id != query.header.id:
        raise ValueError("DNS reply for another query")
    rcode = RCODE.get(reply.header.rcode)
    if expect == "NXDOMAIN":
        if rcode != "NXDOMAIN":
            raise ValueError(f"DNS {query.q.qname}: {rcode}, not NXDOMAIN")
        return
    if rcode != "NOERROR":
        raise ValueError(f"DNS {query.q.qname}: {rcode}")
    wanted = QTYPE.TXT if expect is None else QTYPE.A
    data = [str(rr.rdata) for rr in reply.rr if rr.rtype == wanted]
    if not data or (expect is not None and expect not in data):
        raise ValueError(f"DNS {query.q.qname}: answer {data}")


async def dns_udp(server: str, name: str, qtype: str, expect: str | None, timeout: float) -> None:
    query = _query(name, qtype)
    with _socket(server, socket.SOCK_DGRAM) as sock:
        await asyncio.get_running_loop().sock_connect(sock, (server, 53))
        reply = await _exchange(
            sock, bytes(query.pack()), lambda data: data[:2] == query.pack()[:2], timeout
        )
    _check(query, reply, expect)


async def dns_tcp(server: str, name: str, qtype: str, expect: str | None, timeout: float) -> None:
    query = _query(name, qtype)
    data = bytes(query.pack())
    reader, writer = await asyncio.wait_for(asyncio.open_connection(server, 53), timeout)
    try:
        writer.write(len(data).to_bytes(2, "big") + data)
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), timeout), "big")
        reply = await asyncio.wait_for(reader.readexactly(size), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)
    _check(query, reply, expect)
