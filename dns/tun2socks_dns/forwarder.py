"""The DNS forwarder on the asyncio loop: queries from the TUN in, answers back, upstreams raced.

Theory of operation
-------------------
UDP: the engine hands every datagram to port 53 to ``datagram_received`` (whatever address it
was sent to); the reply goes back from that address and port. TCP: the dialer gives each TCP/53
flow one end of a socket pair whose other end ``open_stream`` serves here with RFC 7766 framing
(pipelined queries, answers in any order), so the relay needs no special case.

Each query goes through the pure ``Resolver`` first (hosts, fake-IP, cache, errors). A query it
cannot answer becomes one pending upstream resolution, shared by every client asking the same
question meanwhile (coalescing), and bounded: at ``max_pending`` resolutions a new one is
dropped (UDP: the client retries) or answered SERVFAIL (TCP), and counted in ``dropped``.

A resolution races the configured upstreams in the order ``UpstreamHealth`` gives (see
``selection.py``): first good answer wins; with none by ``timeout``, SERVFAIL. Without
configured upstreams the query goes to the address it was sent to, over TCP through the proxy;
never to an address of the fake-IP pool (that would hand a fake address to the proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol

from dnslib import DNSError, DNSRecord

from tun2socks.logs import kv

from .message import (
    Query,
    QuestionKey,
    is_good_answer,
    pack_for_tcp,
    pack_for_udp,
    parse_answer,
    upstream_request,
)
from .resolver import Answer, Ask, Refuse, Resolver
from .selection import Outcome, Race, UpstreamHealth
from .upstreams import (
    DestinationUpstreams,
    TcpCounters,
    TcpUpstream,
    UdpUpstream,
    Upstream,
    UpstreamError,
)

log = logging.getLogger("tun2socks.dns")

IPAddress = IPv4Address | IPv6Address
SendDatagram = Callable[[IPAddress, int, IPAddress, int, bytes], None]
Deliver = Callable[[DNSRecord], None]

MAX_WAITERS = 64  # clients sharing one pending resolution
STREAM_IDLE_TIMEOUT = 10.0  # seconds a client's TCP connection may sit without a query
STREAM_MAX_INFLIGHT = 32  # pipelined queries per client TCP connection
WARN_INTERVAL = 60.0  # seconds between repeated warnings about the same upstream
MAX_WARNED = 256


class _DatagramLike(Protocol):
    """What is used of the engine's ``DatagramReceived`` event."""

    @property
    def src(self) -> IPAddress: ...
    @property
    def src_port(self) -> int: ...
    @property
    def dst(self) -> IPAddress: ...
    @property
    def dst_port(self) -> int: ...
    @property
    def payload(self) -> bytes: ...


class _Datagram:
    """What a UDP query needs to be answered: where it came from and where it went."""

    __slots__ = ("dst", "dst_port", "src", "src_port")

    def __init__(self, src: IPAddress, src_port: int, dst: IPAddress, dst_port: int) -> None:
        self.src, self.src_port, self.dst, self.dst_port = src, src_port, dst, dst_port


@dataclass(frozen=True)
class ForwarderSettings:
    timeout: float = 5.0  # a client gets an answer or SERVFAIL within this
    attempt_timeout: float = 2.0  # after this long without an answer, ask the next upstream
    max_pending: int = 1024
    udp_ceiling: int = 1452  # the largest UDP reply that fits the TUN (MTU - IP - UDP)


class DnsForwarder:
    def __init__(
        self,
        resolver: Resolver,
        upstreams: Sequence[Upstream],
        destinations: DestinationUpstreams | None,
        *,
        send_datagram: SendDatagram,
        settings: ForwarderSettings,
    ) -> None:
        if not upstreams and destinations is None:
            raise ValueError("the forwarder needs upstreams or per-destination forwarding")
        self.loop = asyncio.get_running_loop()
        self.resolver = resolver
        self.upstreams = list(upstreams)
        self.destinations = destinations
        self.health = UpstreamHealth(len(self.upstreams))
        self.settings = settings
        self.counters: Counter[str] = Counter()
        self._send_datagram = send_datagram
        self._pending: dict[tuple[QuestionKey, IPAddress | None], list[tuple[Query, Deliver]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._warned: dict[str, float] = {}
        # Done when the path out changes (reopen_upstreams): attempts in flight start again.
        self._path_changed: asyncio.Future[None] = self.loop.create_future()

    # ---------------------------------------------------------------- counters

    def stats(self) -> dict[str, int]:
        counters = Counter(self.resolver.counters)
        counters.update(self.counters)
        counters["tcp_retries"] = sum(
            u.tcp_retries for u in self.upstreams if isinstance(u, UdpUpstream)
        )
        tcp = self._tcp_counters()
        counters["tcp_server_closes"] = tcp.server_closes
        counters["tcp_reconnects"] = tcp.reconnects
        for name in ("queries", "cache_hits", "cache_misses", "upstream_failures", "servfail"):
            counters.setdefault(name, 0)
        for name in ("formerr", "dropped"):
            counters.setdefault(name, 0)
        counters["pending"] = len(self._pending)
        counters["cache_entries"] = len(self.resolver.cache)
        counters["fake_mappings"] = sum(len(p) for p in self.resolver.fake_pools.values())
        return dict(counters)

    def _tcp_counters(self) -> TcpCounters:
        total = TcpCounters()
        if self.destinations is not None:
            total.add(self.destinations.counters())
        for upstream in self.upstreams:
            if isinstance(upstream, UdpUpstream):
                upstream = upstream.tcp
            if isinstance(upstream, TcpUpstream):
                total.add(upstream.counters)
        return total

    # ---------------------------------------------------------------- UDP

    def datagram_received(self, datagram: _DatagramLike) -> None:
        """A UDP datagram to port 53 from the TUN (the engine's ``DatagramReceived``)."""
        self.counters["udp_queries"] += 1
        origin = _Datagram(datagram.src, datagram.src_port, datagram.dst, datagram.dst_port)
        verdict = self.resolver.handle(datagram.payload, self.loop.time())
        if isinstance(verdict, Refuse):
            if verdict.reply is not None:
                self._reply_udp(origin, verdict.reply)
            return
        query = verdict.query
        deliver = self._udp_deliverer(origin, query)
        if isinstance(verdict, Answer):
            deliver(verdict.reply)
        elif not self._ask(query, origin.dst, deliver):
            self.counters["dropped"] += 1

    def _udp_deliverer(self, origin: _Datagram, query: Query) -> Deliver:
        limit = query.udp_limit(self.settings.udp_ceiling)

        def deliver(reply: DNSRecord) -> None:
            data, truncated = pack_for_udp(reply, limit)
            if truncated:
                self.counters["truncated"] += 1
            self._reply_udp(origin, data)

        return deliver

    def _reply_udp(self, origin: _Datagram, data: bytes) -> None:
        self._send_datagram(origin.dst, origin.dst_port, origin.src, origin.src_port, data)

    # ---------------------------------------------------------------- TCP

    def open_stream(self, dst: IPAddress) -> socket.socket:
        """A socket for the relay of a TCP/53 flow to ``dst``; its peer is served here."""
        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):
            sock.setblocking(False)
        self._spawn(self._serve_stream(ours, dst))
        return theirs

    async def _serve_stream(self, sock: socket.socket, dst: IPAddress) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        slots = asyncio.Semaphore(STREAM_MAX_INFLIGHT)  # reading stops while all are taken
        inflight = 0
        all_answered = asyncio.Event()
        all_answered.set()

        def write_frame(data: bytes) -> None:
            if not writer.is_closing():
                writer.write(len(data).to_bytes(2, "big") + data)

        def answered_later(reply: DNSRecord) -> None:
            nonlocal inflight
            write_frame(pack_for_tcp(reply))
            slots.release()
            inflight -= 1
            if not inflight:
                all_answered.set()

        try:
            while True:
                await slots.acquire()
                try:
                    async with asyncio.timeout(STREAM_IDLE_TIMEOUT):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        message = await reader.readexactly(size)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    break
                self.counters["tcp_queries"] += 1
                verdict = self.resolver.handle(message, self.loop.time())
                if isinstance(verdict, Ask):
                    inflight += 1
                    all_answered.clear()
                    if not self._ask(verdict.query, dst, answered_later):
                        self.counters["dropped"] += 1
                        answered_later(self.resolver.resolved(verdict.query, None))
                    continue
                slots.release()
                if isinstance(verdict, Answer):
                    write_frame(pack_for_tcp(verdict.reply))
                elif verdict.reply is not None:
                    write_frame(verdict.reply)
                else:
                    break  # not DNS at all: end the conversation
            # The client sent all it will send: give the answers still coming, then close.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.timeout + 1.0):
                    await all_answered.wait()
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()

    # ---------------------------------------------------------------- resolutions

    def _ask(self, query: Query, dst: IPAddress, deliver: Deliver) -> bool:
        """Join or start the resolution of ``query``; False when the pending cap refuses it."""
        key = (query.key, None if self.upstreams else dst)
        waiters = self._pending.get(key)
        if waiters is not None:
            if len(waiters) >= MAX_WAITERS:
                return False
            waiters.append((query, deliver))
            self.counters["coalesced"] += 1
            return True
        if len(self._pending) >= self.settings.max_pending:
            return False
        self._pending[key] = [(query, deliver)]
        self._spawn(self._resolve(key, dst))
        return True

    async def _resolve(self, key: tuple[QuestionKey, IPAddress | None], dst: IPAddress) -> None:
        question = key[0]
        answer: DNSRecord | None = None
        try:
            answer = await self._race(question, dst)
        finally:
            waiters = self._pending.pop(key, [])
        if answer is not None:
            self.resolver.remember(question, answer, self.loop.time())
        for query, deliver in waiters:
            deliver(self.resolver.resolved(query, answer))

    async def _race(self, question: QuestionKey, dst: IPAddress) -> DNSRecord | None:
        now = self.loop.time()
        if self.upstreams:
            candidates = self.upstreams
            order = self.health.order(now)
        else:
            if self.resolver.is_fake(dst):
                self.counters["fake_resolver"] += 1
                return None
            assert self.destinations is not None
            candidates = [self.destinations.for_destination(dst)]
            order = [0]
        race = Race(
            order,
            now,
            attempt_timeout=self.settings.attempt_timeout,
            deadline=now + self.settings.timeout,
        )
        request = upstream_request(question, secrets.randbelow(0x10000))
        attempts: dict[asyncio.Task[DNSRecord], int] = {}

        def launch(indexes: list[int]) -> None:
            for index in indexes:
                task = self.loop.create_task(self._attempt(candidates[index], request, question))
                attempts[task] = index

        launch(race.start(now))
        answer: DNSRecord | None = None
        try:
            while race.outcome is Outcome.PENDING:
                deadline = race.get_timer()
                wait = max(0.0, (deadline or now) - self.loop.time())
                done: set[asyncio.Task[DNSRecord]] = set()
                if not attempts:  # cannot happen (Race keeps one running), but never spin
                    await asyncio.sleep(wait)
                else:
                    changed = self._path_changed
                    finished, _ = await asyncio.wait(
                        [*attempts, changed], timeout=wait, return_when=asyncio.FIRST_COMPLETED
                    )
                    if changed in finished:
                        # The path out changed: an attempt sent the old way may never be
                        # answered (its connection's address is gone). Ask again the new way,
                        # within the same race and deadline.
                        for task, index in list(attempts.items()):
                            task.cancel()
                            del attempts[task]
                            launch([index])
                        self.counters["asked_again_after_change"] += 1
                        continue
                    done = {task for task in attempts if task in finished}
                now = self.loop.time()
                if not done:
                    launch(race.handle_timer(now))
                    continue
                for task in done:
                    index = attempts.pop(task)
                    error = task.exception()
                    if error is None:
                        race.answered(index)
                        self._succeeded(candidates[index], index if self.upstreams else None)
                        answer = task.result()
                        break
                    self._failed(candidates[index], index if self.upstreams else None, error)
                    launch(race.failed(index, now))
            # Attempts still running after their full attempt time are failures (too slow).
            for index in race.overdue(self.loop.time()):
                self._failed(candidates[index], index if self.upstreams else None, TimeoutError())
            return answer
        finally:
            for task in attempts:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # finished meanwhile, lost the race: read its outcome

    async def _attempt(
        self, upstream: Upstream, request: bytes, question: QuestionKey
    ) -> DNSRecord:
        self.counters["upstream_queries"] += 1
        data = await upstream.query(request)
        try:
            answer = parse_answer(data, question)
        except DNSError as exc:
            raise UpstreamError(str(exc)) from None
        if not is_good_answer(answer):
            rcode = answer.header.rcode
            raise UpstreamError(f"answered rcode {rcode}" if rcode else "truncated answer")
        return answer

    def _succeeded(self, upstream: Upstream, index: int | None) -> None:
        if index is not None and self.health.succeeded(index):
            log.info("dns upstream %s answers again", upstream.label)
            self._warned.pop(upstream.label, None)

    def _failed(self, upstream: Upstream, index: int | None, error: BaseException) -> None:
        self.counters["upstream_failures"] += 1
        now = self.loop.time()
        if index is not None:
            self.health.failed(index, now)
        reason = _describe(error)
        last = self._warned.get(upstream.label)
        if len(self._warned) > MAX_WARNED:  # labels of per-destination upstreams come and go
            self._warned.clear()
        if last is None or now - last >= WARN_INTERVAL:
            self._warned[upstream.label] = now
            log.warning("dns upstream %s failed: %s", upstream.label, reason)
        else:
            log.debug("dns upstream %s failed: %s", upstream.label, reason)

    # ---------------------------------------------------------------- lifecycle

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("dns: internal error", exc_info=task.exception())

    def close_with(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Await `closer` first in close() (a part built with the forwarder, e.g. its store)."""
        self._closers.append(closer)

    def reopen_upstreams(self) -> None:
        """The path out of the host changed (tun2socks.path_watch): the shared upstream
        connections (TCP streams, the UDP association, DoH sessions) are replaced on the
        next query, and upstreams that failed during the change get a fresh start."""
        for upstream in self.upstreams:
            upstream.reopen()
        if self.destinations is not None:
            self.destinations.reopen()
        self.health = UpstreamHealth(len(self.upstreams))
        self.counters["reopened"] += 1
        changed, self._path_changed = self._path_changed, self.loop.create_future()
        changed.set_result(None)  # queries in flight ask again by the new path (see _race)
        log.info("network changed: dns upstream connections reopen on the next query")

    async def close(self) -> None:
        for closer in self._closers:
            await closer()
        log.info("dns forwarder stopping", extra=kv(**self.stats()))
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for upstream in self.upstreams:
            await upstream.close()
        if self.destinations is not None:
            await self.destinations.close()


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
