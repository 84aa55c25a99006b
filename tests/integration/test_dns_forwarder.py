"""The forwarder's asyncio side against real DNS servers on loopback (no root needed): failover
between upstreams, TCP connection reuse and pipelining, coalescing, the pending-query cap,
client TCP streams, truncation retried over TCP. Timeouts are short and real; each test is
bounded by ``asyncio.timeout``."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from typing import Any, cast

import pytest
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSRecord

from tun2socks.outbound.socks5 import Socks5ReplyError
from tun2socks.outbound.socks5_udp import UdpAssociation
from tun2socks_dns.cache import CacheSettings, DnsCache
from tun2socks_dns.forwarder import DnsForwarder, ForwarderSettings
from tun2socks_dns.hosts import StaticHosts
from tun2socks_dns.resolver import Resolver
from tun2socks_dns.socks_udp import OnClose, OnDatagram, SocksUdpExchange
from tun2socks_dns.upstreams import (
    TcpUpstream,
    UdpUpstream,
    Upstream,
    plain_tcp_connect,
    plain_udp_exchange,
)

LOOPBACK = IPv4Address("127.0.0.1")
CLIENT = IPv4Address("198.18.254.1")
RESOLVER = IPv4Address("192.0.2.53")
ANSWER = "192.0.2.7"


class DnsServer:
    """A small real DNS server (UDP and TCP) on 127.0.0.1 with switchable behaviour."""

    def __init__(self, *, silent: bool = False, rcode: int = RCODE.NOERROR) -> None:
        self.silent = silent
        self.rcode = rcode
        self.big = False  # TXT answers too big for UDP: truncated there
        self.queries: list[tuple[str, str]] = []  # (transport, name)
        self.hang_up_on: set[int] = set()  # TCP: close instead of answering query number N
        self.close_after = 0  # TCP: close each connection after answering this many (as dnsmasq)
        self.received: list[int] = []  # TCP: queries read on each connection, by connection
        self.connections = 0
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def answer(self, data: bytes, transport: str) -> bytes | None:
        query = DNSRecord.parse(data)
        self.queries.append((transport, str(query.q.qname).rstrip(".")))
        if self.silent:
            return None
        reply = query.reply()
        reply.header.rcode = self.rcode
        if self.rcode == RCODE.NOERROR:
            if query.q.qtype == QTYPE.TXT:
                for i in range(8 if self.big else 1):
                    reply.add_answer(
                        RR(query.q.qname, QTYPE.TXT, ttl=60, rdata=TXT("x" * 200 + str(i)))
                    )
            else:
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=60, rdata=A(ANSWER)))
        data = bytes(reply.pack())
        if transport == "udp" and len(data) > 512:
            data = bytes(reply.truncate().pack())
        return data

    async def start(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = server.answer(data, "udp")
                if reply is not None:
                    self.transport.sendto(reply, addr)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            if task is not None:
                self._handlers.add(task)
            self._writers.append(writer)
            answered = 0
            index = len(self.received)
            self.received.append(0)
            try:
                while not self.close_after or answered < self.close_after:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    self.received[index] += 1
                    reply = self.answer(await reader.readexactly(size), "tcp")
                    if len(self.queries) in self.hang_up_on:
                        break
                    if reply is not None:
                        writer.write(len(reply).to_bytes(2, "big") + reply)
                        answered += 1
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            writer.close()

        self._tcp = await asyncio.start_server(tcp, "127.0.0.1", 0)
        self.port = self._tcp.sockets[0].getsockname()[1]
        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", self.port))
        return self

    async def aclose(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def tcp_upstream(self) -> TcpUpstream:
        return TcpUpstream(f"tcp {self.port}", plain_tcp_connect(LOOPBACK, self.port, None))

    def udp_upstream(self) -> UdpUpstream:
        return UdpUpstream(
            f"udp {self.port}", plain_udp_exchange(LOOPBACK, self.port, None), self.tcp_upstream()
        )


class Client:
    """The TUN side: datagrams handed to the forwarder, replies collected."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[DNSRecord] = asyncio.Queue()
        self.port = 40000

    def send_datagram(self, src: object, sport: int, dst: object, dport: int, data: bytes) -> None:
        assert (src, sport, dst) == (RESOLVER, 53, CLIENT)
        self.replies.put_nowait(DNSRecord.parse(data))

    def ask(self, forwarder: DnsForwarder, name: str, qtype: str = "A", qid: int = 1) -> None:
        record = DNSRecord.question(name, qtype)
        record.header.id = qid
        self.port += 1
        forwarder.datagram_received(
            _Datagram(CLIENT, self.port, RESOLVER, 53, bytes(record.pack()))
        )

    async def reply(self, timeout: float = 5.0) -> DNSRecord:
        async with asyncio.timeout(timeout):
            return await self.replies.get()


@dataclass(frozen=True)
class _Datagram:  # the fields of the engine's DatagramReceived event
    src: IPv4Address
    src_port: int
    dst: IPv4Address
    dst_port: int
    payload: bytes


@asynccontextmanager
async def forwarder(
    upstreams: list[Upstream], **settings: float
) -> AsyncIterator[tuple[DnsForwarder, Client]]:
    client = Client()
    resolver = Resolver(cache=DnsCache(CacheSettings(size=0)), hosts=StaticHosts({}))
    options = {"timeout": 2.0, "attempt_timeout": 0.5, **settings}
    fwd = DnsForwarder(
        resolver,
        upstreams,
        None,
        send_datagram=client.send_datagram,
        settings=ForwarderSettings(**options),
    )
    try:
        yield fwd, client
    finally:
        await fwd.close()


def run(coroutine_function: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await coroutine_function()

    asyncio.run(bounded())


def test_failover_from_a_refusing_and_a_silent_upstream() -> None:
    async def main() -> None:
        refusing = await DnsServer(rcode=RCODE.REFUSED).start()
        silent = await DnsServer(silent=True).start()
        good = await DnsServer().start()
        ups: list[Upstream] = [refusing.tcp_upstream(), silent.tcp_upstream(), good.tcp_upstream()]
        async with forwarder(ups, attempt_timeout=0.3) as (fwd, client):
            loop = asyncio.get_running_loop()
            began = loop.time()
            client.ask(fwd, "a.test")
            reply = await client.reply()
            assert str(reply.rr[0].rdata) == ANSWER
            # refused: next at once; silent: next after the attempt timeout
            assert 0.25 < loop.time() - began < 1.5
            assert [len(s.queries) for s in (refusing, silent, good)] == [1, 1, 1]
            # both failing upstreams are now down: the next query goes to the good one first
            client.ask(fwd, "b.test")
            await client.reply()
            assert [len(s.queries) for s in (refusing, silent, good)] == [1, 1, 2]
            assert fwd.stats()["upstream_failures"] == 2
        for s in (refusing, silent, good):
            await s.aclose()

    run(main)


def test_all_upstreams_failing_gives_servfail_before_the_deadline() -> None:
    async def main() -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # nothing listens there: connection refused
        dead = TcpUpstream("dead", plain_tcp_connect(LOOPBACK, port, None))
        refusing = await DnsServer(rcode=RCODE.SERVFAIL).start()
        async with forwarder([dead, refusing.tcp_upstream()], timeout=3.0) as (fwd, client):
            loop = asyncio.get_running_loop()
            began = loop.time()
            client.ask(fwd, "a.test", qid=77)
            reply = await client.reply()
            assert (reply.header.rcode, reply.header.id) == (RCODE.SERVFAIL, 77)
            assert loop.time() - began < 1.0  # both failed: no need to wait for the deadline
        await refusing.aclose()

    run(main)


def test_tcp_upstream_connection_is_reused_and_pipelined() -> None:
    async def main() -> None:
        server = await DnsServer().start()
        async with forwarder([server.tcp_upstream()]) as (fwd, client):
            for i in range(20):
                client.ask(fwd, f"n{i}.test", qid=i)
            replies = [await client.reply() for _ in range(20)]
            assert sorted(r.header.id for r in replies) == list(range(20))
            assert all(str(r.q.qname) == f"n{r.header.id}.test." for r in replies)
            assert server.connections == 1
        await server.aclose()

    run(main)


def test_reused_tcp_connection_closed_by_the_server_costs_one_retry() -> None:
    async def main() -> None:
        server = await DnsServer().start()
        server.hang_up_on = {2}  # the second query: the server closes instead of answering
        async with forwarder([server.tcp_upstream()]) as (fwd, client):
            client.ask(fwd, "a.test")
            assert (await client.reply()).header.rcode == RCODE.NOERROR
            client.ask(fwd, "b.test")
            reply = await client.reply()
            assert reply.header.rcode == RCODE.NOERROR and str(reply.q.qname) == "b.test."
            assert server.connections == 2
            assert [name for _, name in server.queries] == ["a.test", "b.test", "b.test"]
            assert fwd.stats()["upstream_failures"] == 0
        await server.aclose()

    run(main)


def test_queries_in_flight_when_the_server_closes_are_sent_again_rfc7766_section_6_2_3() -> None:
    # dnsmasq's way: answer 100 queries on a connection, then close it with more unread (the
    # kernel then resets it). 250 pipelined queries need three connections; none fails, and
    # after the first close no connection gets more than the 100 the server showed it takes.
    async def main() -> None:
        server = await DnsServer().start()
        server.close_after = 100
        async with forwarder([server.tcp_upstream()]) as (fwd, client):
            for i in range(250):
                client.ask(fwd, f"n{i}.test", qid=i)
            replies = [await client.reply() for _ in range(250)]
            assert sorted(r.header.id for r in replies) == list(range(250))
            assert all(r.header.rcode == RCODE.NOERROR for r in replies)
            assert server.connections == 3
            assert server.received[0] == 100 and server.received[1:] == [100, 50]
            stats = fwd.stats()
            assert stats["tcp_server_closes"] == stats["tcp_reconnects"] == 2
            assert stats["upstream_failures"] == 0
        await server.aclose()

    run(main)


def test_identical_questions_share_one_upstream_query() -> None:
    async def main() -> None:
        server = await DnsServer().start()
        async with forwarder([server.tcp_upstream()]) as (fwd, client):
            for qid in range(5):
                client.ask(fwd, "same.test", qid=qid)
            ids = sorted([(await client.reply()).header.id for _ in range(5)])
            assert ids == list(range(5))
            assert len(server.queries) == 1
            assert fwd.stats()["coalesced"] == 4
        await server.aclose()

    run(main)


def test_pending_cap_drops_the_flood_and_recovers() -> None:
    async def main() -> None:
        silent = await DnsServer(silent=True).start()
        async with forwarder([silent.tcp_upstream()], max_pending=4, timeout=1.0) as (fwd, client):
            for i in range(50):
                client.ask(fwd, f"flood{i}.test", qid=i)
            assert fwd.stats()["pending"] == 4
            assert fwd.stats()["dropped"] == 46
            replies = [await client.reply() for _ in range(4)]  # SERVFAIL after the timeout
            assert {r.header.rcode for r in replies} == {RCODE.SERVFAIL}
            assert client.replies.empty()
            assert fwd.stats()["pending"] == 0
            silent.silent = False
            client.ask(fwd, "after.test")
            assert (await client.reply()).header.rcode == RCODE.NOERROR
        await silent.aclose()

    run(main)


def test_udp_upstream_retries_a_truncated_answer_over_tcp() -> None:
    async def main() -> None:
        server = await DnsServer().start()
        server.big = True
        upstream = server.udp_upstream()
        async with forwarder([upstream]) as (fwd, client):
            client.ask(fwd, "big.test", "TXT")
            reply = await client.reply()
            # the client asked without EDNS: its reply is truncated in turn (it would retry TCP)
            assert reply.header.tc == 1
            assert [t for t, _ in server.queries] == ["udp", "tcp"]
            assert upstream.tcp_retries == 1 and fwd.stats()["tcp_retries"] == 1
        await server.aclose()

    run(main)


def test_client_tcp_stream_pipelined_and_answered_after_half_close() -> None:
    async def main() -> None:
        server = await DnsServer().start()
        async with forwarder([server.tcp_upstream()]) as (fwd, _client):
            sock = fwd.open_stream(ip_address("192.0.2.53"))
            reader, writer = await asyncio.open_connection(sock=sock)
            for qid in range(3):
                record = DNSRecord.question(f"t{qid}.test")
                record.header.id = qid
                data = bytes(record.pack())
                writer.write(len(data).to_bytes(2, "big") + data)
            writer.write_eof()  # half-close: the answers must still come
            ids = []
            for _ in range(3):
                size = int.from_bytes(await reader.readexactly(2), "big")
                ids.append(DNSRecord.parse(await reader.readexactly(size)).header.id)
            assert sorted(ids) == [0, 1, 2]
            assert await reader.read() == b""  # then the forwarder closes
            writer.close()
            assert fwd.stats()["tcp_queries"] == 3
        await server.aclose()

    run(main)


@pytest.mark.parametrize("garbage", [b"\x00\x05hello", b"\x00\x02\x12"])
def test_client_tcp_stream_closed_on_garbage(garbage: bytes) -> None:
    async def main() -> None:
        server = await DnsServer().start()
        async with forwarder([server.tcp_upstream()]) as (fwd, _client):
            reader, writer = await asyncio.open_connection(sock=fwd.open_stream(RESOLVER))
            writer.write(garbage)
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
        await server.aclose()

    run(main)


def test_udp_upstream_uses_tcp_when_the_proxy_refuses_udp_associate() -> None:
    async def main() -> None:
        server = await DnsServer().start()
        attempts = 0

        async def associate(on_datagram: OnDatagram, on_close: OnClose) -> UdpAssociation:
            nonlocal attempts
            attempts += 1  # what socks5_udp.associate raises for REP 7
            raise Socks5ReplyError("command not supported", "proxy", "relay", "UDP ASSOCIATE", 7)

        exchange = SocksUdpExchange(LOOPBACK, server.port, associate)
        upstream = UdpUpstream(
            "udp", exchange, server.tcp_upstream(), close_exchange=exchange.close
        )
        async with forwarder([upstream]) as (fwd, client):
            for name in ("a.test", "b.test"):
                client.ask(fwd, name)
                assert (await client.reply()).header.rcode == RCODE.NOERROR
            assert upstream.udp_unsupported and attempts == 1  # asked once, then TCP only
            assert [t for t, _ in server.queries] == ["tcp", "tcp"]
            assert fwd.stats()["upstream_failures"] == 0
        await server.aclose()

    run(main)
