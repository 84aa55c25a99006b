"""Pre-established SOCKS5 sessions: connections to one proxy, logged in, waiting for a CONNECT.

Theory of operation: a new flow normally pays TCP connect, greeting, (authentication) and
CONNECT before its SYN-ACK. ``SessionPool.take`` hands out a session on which the first steps
are done, so the flow pays the CONNECT round trip only (``socks5.connect_on_session``). The
sizing rules are ``pool_policy.PoolPolicy``: sessions are opened in the background right
after a flow was made, as many as flows were made in the last second (at most
``proxy.pool.size``), never while no flows are made, closed after ``proxy.pool.max_age``, and
none at all for a proxy nearer than ``proxy.pool.min_round_trip``: every login, the pool's and
the fresh dials' (``round_trip_seen``), tells the policy how far away the proxy is.

A waiting session should receive nothing: the loop watches each one, and one that becomes
readable (the proxy closed it on an idle timeout, was restarted, reset it) is discarded at
once. ``take`` checks again with a non-blocking peek (the close may not have been seen yet),
and a session that still fails on its CONNECT before any reply byte raises
``Socks5SessionLost``: the dialer then dials a fresh connection for the flow, so the client
never sees it. Opening errors are counted, not logged: the flows dial the proxy themselves
and log what is wrong once.

``SessionPools`` is the registry the composition root keeps: stats per pool, a flush on each
network change (``path_watch.py``), and shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from tun2socks.outbound.pipeline_probe import Pipelining
from tun2socks.outbound.pool_policy import PoolPolicy
from tun2socks.outbound.socks5 import RoundTripObserver

# Opens one logged-in session, telling the observer its login's round trip.
OpenSession = Callable[[RoundTripObserver], Awaitable[socket.socket]]


@dataclass(eq=False)  # compared by identity: one per socket
class _Session:
    sock: socket.socket
    opened_at: float
    expiry: asyncio.TimerHandle | None = None


@dataclass
class PoolCounters:
    hits: int = 0  # flows that got a ready session
    misses: int = 0  # flows that found none and dialed a fresh connection
    discarded: int = 0  # sessions found dead (closed or reset by the proxy, stray bytes)
    expired: int = 0  # sessions closed unused at max_age
    opened: int = 0
    open_failures: int = 0


@dataclass
class SessionPool:
    """Logged-in sessions to one proxy; ``take`` one per new flow."""

    open_session: OpenSession
    policy: PoolPolicy
    counters: PoolCounters = field(default_factory=PoolCounters)

    def __post_init__(self) -> None:
        self._ready: deque[_Session] = deque()
        self._opening: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._generation = 0  # flush() bumps it: sessions opened before are not kept

    def take(self) -> socket.socket | None:
        """A live logged-in session (non-blocking, no longer watched) or None; records the
        flow. Call ``refill`` once the flow's dial is done."""
        loop = self._loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        self.policy.flow_made(now)
        found = None
        while self._ready and found is None:
            session = self._ready.popleft()
            self._unwatch(session)
            if not self.policy.expired(session.opened_at, now) and _alive(session.sock):
                found = session.sock
            else:
                session.sock.close()
                self.counters.discarded += 1
        if found is None:
            self.counters.misses += 1
        else:
            self.counters.hits += 1
        return found

    def lost(self) -> None:
        """A session from ``take`` failed its CONNECT before any reply: it was dead."""
        self.counters.hits -= 1
        self.counters.discarded += 1
        self.counters.misses += 1

    def round_trip_seen(self, seconds: float) -> None:
        """A login to this proxy took `seconds` from greeting to method selection."""
        self.policy.round_trip_seen(seconds)

    def refill(self) -> None:
        """Open the sessions the recent flows call for, in the background. After the flow's
        own dial, not before: on a busy proxy the new logins would delay its CONNECT."""
        if self._closed or self._loop is None:
            return
        now = self._loop.time()
        for _ in range(self.policy.to_open(now, len(self._ready), len(self._opening))):
            task = self._loop.create_task(self._open_one())
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open_one(self) -> None:
        assert self._loop is not None
        generation = self._generation
        try:
            sock = await self.open_session(self.round_trip_seen)
        except Exception:  # any failure: no session; the flows dial and report it
            self.counters.open_failures += 1
            self.policy.open_failed(self._loop.time())
            return
        if self._closed or generation != self._generation:
            sock.close()
            return
        self.counters.opened += 1
        session = _Session(sock, self._loop.time())
        self._ready.append(session)
        self._loop.add_reader(sock.fileno(), self._readable, session)
        when = self.policy.expires_at(session.opened_at)
        session.expiry = self._loop.call_at(when, self._expire, session)

    def _unwatch(self, session: _Session) -> None:
        assert self._loop is not None
        self._loop.remove_reader(session.sock.fileno())
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None

    def _drop(self, session: _Session) -> bool:
        if session not in self._ready:
            return False
        self._ready.remove(session)
        self._unwatch(session)
        session.sock.close()
        return True

    def _readable(self, session: _Session) -> None:
        # Nothing is due on a waiting session: EOF, a reset or stray bytes all end it.
        if self._drop(session):
            self.counters.discarded += 1

    def _expire(self, session: _Session) -> None:
        if self._drop(session):
            self.counters.expired += 1

    def flush(self) -> None:
        """Drop every ready session, and those still being opened when they arrive: after a
        network change they may leave from an address or link that is gone, where a CONNECT
        would wait for its timeout instead of failing."""
        self._generation += 1
        self.policy.forget_round_trips()
        for session in list(self._ready):
            if self._drop(session):
                self.counters.discarded += 1

    def stats(self) -> dict[str, int]:
        now = self._loop.time() if self._loop is not None else time.monotonic()
        round_trip = self.policy.round_trip
        return {
            "size": len(self._ready),
            "opening": len(self._opening),
            "target": self.policy.target(now) if self._loop is not None else 0,
            # The smallest login round trip since the last network change (0: none yet);
            # below proxy.pool.min_round_trip the pool stays empty.
            "round_trip_us": round(round_trip * 1e6) if round_trip is not None else 0,
            **vars(self.counters),
        }

    async def close(self) -> None:
        self._closed = True
        for session in list(self._ready):
            self._drop(session)
        for task in list(self._opening):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _alive(sock: socket.socket) -> bool:
    """No EOF, reset or data waiting: what an idle logged-in session looks like."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # EOF (b"") or bytes nobody asked for


class SessionPools:
    """Every proxy's pool and pipelining state, by stats name: for /stats and shutdown."""

    def __init__(self) -> None:
        self._pools: dict[str, SessionPool] = {}
        self._pipelining: dict[str, Pipelining] = {}

    def add(self, name: str, pipelining: Pipelining, pool: SessionPool | None) -> None:
        self._pipelining[name] = pipelining
        if pool is not None:
            self._pools[name] = pool

    def stats_sources(self) -> Mapping[str, Callable[[], Mapping[str, int]]]:
        return {name: self._source(name) for name in self._pipelining}

    def _source(self, name: str) -> Callable[[], Mapping[str, int]]:
        def stats() -> Mapping[str, int]:
            pool = self._pools.get(name)
            found = pool.stats() if pool is not None else {}
            return {**found, "pipeline": self._pipelining[name].state()}

        return stats

    def flush(self) -> None:
        """The network changed: no pool keeps a session made before (SessionPool.flush)."""
        for pool in self._pools.values():
            pool.flush()

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        for pipelining in self._pipelining.values():
            await pipelining.close()
