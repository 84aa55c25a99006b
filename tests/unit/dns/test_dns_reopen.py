"""After a network change the DNS forwarder's shared upstream connections are replaced
(issue 15, build 2): the next query opens a new one by the new path, while the old one still
delivers the answers it carries, and a query in flight is asked again the new way
(tun2socks_dns.socks_udp.SocksUdpExchange.reopen, tun2socks_dns.upstreams.TcpUpstream.reopen,
tun2socks_dns.forwarder.DnsForwarder.reopen_upstreams). In memory: associations are lists, TCP
connections socket pairs whose far end answers as a DNS server over TCP (RFC 7766)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import cast

from dnslib import QTYPE, RR, A, DNSRecord

from tun2socks.outbound.socks5_udp import UdpAssociation
from tun2socks_dns.cache import CacheSettings, DnsCache
from tun2socks_dns.forwarder import DnsForwarder, ForwarderSettings
from tun2socks_dns.hosts import StaticHosts
from tun2socks_dns.message import question_key, upstream_request
from tun2socks_dns.resolver import Resolver
from tun2socks_dns.socks_udp import OnClose, OnDatagram, SocksUdpExchange
from tun2socks_dns.upstreams import TcpUpstream

SERVER = IPv4Address("192.0.2.53")


def request(name: str) -> bytes:
    return upstream_request(question_key(DNSRecord.question(name).q), 0)


def answer_to(query: bytes, address: str) -> bytes:
    record = DNSRecord.parse(query).reply()
    record.add_answer(RR(record.q.qname, QTYPE.A, ttl=60, rdata=A(address)))
    return bytes(record.pack())


class Association:
    """What SocksUdpExchange uses of a UdpAssociation."""

    def __init__(self, receive: OnDatagram) -> None:
        self.receive = receive
        self.sent: list[bytes] = []
        self.closed = False
        self.on_close: OnClose | None = None

    def send(self, host: str, port: int, payload: bytes) -> bool:
        self.sent.append(bytes(payload))
        return True

    def close(self) -> None:
        self.closed = True


def test_udp_association_is_replaced_and_the_old_one_still_answers_its_query() -> None:
    async def main() -> None:
        opened: list[Association] = []

        async def associate(on_datagram: OnDatagram, on_close: OnClose) -> UdpAssociation:
            opened.append(Association(on_datagram))
            opened[-1].on_close = on_close
            return cast(UdpAssociation, opened[-1])

        exchange = SocksUdpExchange(SERVER, 53, associate, random_bits=lambda n: 0)
        first = asyncio.ensure_future(exchange(request("a.test")))
        while not opened or not opened[0].sent:
            await asyncio.sleep(0)
        exchange.reopen()  # the path changed while the query is out
        assert opened[0].on_close is None  # its end would no longer fail the new queries
        second = asyncio.ensure_future(exchange(request("b.test")))
        while len(opened) < 2 or not opened[1].sent:
            await asyncio.sleep(0)
        old, new = opened
        old.receive(str(SERVER), 53, answer_to(old.sent[0], "192.0.2.1"))
        new.receive(str(SERVER), 53, answer_to(new.sent[0], "192.0.2.2"))
        answers = [DNSRecord.parse(await asyncio.wait_for(q, 1.0)) for q in (first, second)]
        assert [str(a.rr[0].rdata) for a in answers] == ["192.0.2.1", "192.0.2.2"]
        assert not old.closed  # closed after REOPEN_GRACE, not at once
        await exchange.close()
        assert new.closed

    asyncio.run(main())


async def serve_dns_over_tcp(sock: socket.socket, address: str) -> None:
    """Answer each length-prefixed query on `sock` with an A record (RFC 7766 section 8)."""
    loop = asyncio.get_running_loop()
    buffer = b""
    while True:
        data = await loop.sock_recv(sock, 4096)
        if not data:
            return
        buffer += data
        while len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2], "big"):
            size = int.from_bytes(buffer[:2], "big")
            query, buffer = buffer[2 : 2 + size], buffer[2 + size :]
            reply = answer_to(query, address)
            await loop.sock_sendall(sock, len(reply).to_bytes(2, "big") + reply)


def test_tcp_stream_is_replaced_on_reopen_and_the_next_query_uses_a_new_connection() -> None:
    async def main() -> None:
        servers: list[asyncio.Task[None]] = []
        far_ends: list[socket.socket] = []

        async def connect() -> socket.socket:
            near, far = socket.socketpair()
            near.setblocking(False)
            far.setblocking(False)
            far_ends.append(far)
            servers.append(
                asyncio.ensure_future(serve_dns_over_tcp(far, f"192.0.2.{len(far_ends)}"))
            )
            return near

        upstream = TcpUpstream("tcp://192.0.2.53:53", connect)
        first = DNSRecord.parse(await asyncio.wait_for(upstream.query(request("a.test")), 1.0))
        again = DNSRecord.parse(await asyncio.wait_for(upstream.query(request("a.test")), 1.0))
        assert len(far_ends) == 1  # one connection carries both (pipelined, RFC 7766)
        upstream.reopen()
        after = DNSRecord.parse(await asyncio.wait_for(upstream.query(request("b.test")), 1.0))
        assert len(far_ends) == 2
        addresses = [str(r.rr[0].rdata) for r in (first, again, after)]
        assert addresses == ["192.0.2.1", "192.0.2.1", "192.0.2.2"]
        await upstream.close()
        for task in servers:
            task.cancel()
        for far in far_ends:
            far.close()

    asyncio.run(main())


class PathOfTheMoment:
    """An upstream whose first path never answers (its address went away) and whose path
    after reopen() answers at once."""

    label = "udp://192.0.2.53:53"

    def __init__(self) -> None:
        self.path = 0
        self.asked: list[int] = []

    async def query(self, request: bytes) -> bytes:
        self.asked.append(self.path)
        if self.path == 0:
            await asyncio.get_running_loop().create_future()  # never answered
        return answer_to(request, "192.0.2.7")

    def reopen(self) -> None:
        self.path += 1

    async def close(self) -> None:
        pass


@dataclass
class Datagram:
    src: IPv4Address
    src_port: int
    dst: IPv4Address
    dst_port: int
    payload: bytes


def test_a_query_in_flight_when_the_path_changes_is_asked_again_by_the_new_path() -> None:
    """Without asking again it would wait for the old connection until the client's
    deadline (5 s) and get SERVFAIL; dig's retries join the same pending resolution."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        upstream = PathOfTheMoment()
        replies: list[tuple[bytes, float]] = []
        resolver = Resolver(cache=DnsCache(CacheSettings(size=0)), hosts=StaticHosts({}))
        forwarder = DnsForwarder(
            resolver,
            [upstream],
            None,
            send_datagram=lambda *args: replies.append((args[-1], loop.time())),
            settings=ForwarderSettings(timeout=5.0, attempt_timeout=2.0),
        )
        client = IPv4Address("198.18.254.1")
        query = bytes(DNSRecord.question("a.test").pack())
        forwarder.datagram_received(Datagram(client, 5353, SERVER, 53, query))
        while not upstream.asked:
            await asyncio.sleep(0)
        changed_at = loop.time()
        forwarder.reopen_upstreams()
        while not replies:
            await asyncio.sleep(0.01)
        ((data, answered_at),) = replies
        assert upstream.asked == [0, 1]
        assert str(DNSRecord.parse(data).rr[0].rdata) == "192.0.2.7"
        assert answered_at - changed_at < 0.5
        await forwarder.close()

    asyncio.run(asyncio.wait_for(main(), 10.0))
