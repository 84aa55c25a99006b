"""Proxy failover: one dialer over an ordered list of proxies (``proxy.url: [A, B]``).

Theory of operation
-------------------
Each flow goes to the first proxy that is up, in the configured order. When connecting to a
proxy fails (refused, unreachable, reset or garbled handshake, rejected login) or takes longer
than ``ATTEMPT_TIMEOUT_S`` while another proxy is left to try, that proxy is marked down at
once and the same flow is tried on the next one: the client's SYN is held meanwhile (the
stack answers only once the upstream is connected), so it sees one slower handshake, not a
reset. A failure *reply* (the proxy could not reach the destination) says nothing against the
proxy and is passed on as it is.

A proxy that is down gets a background probe (a TCP connect and a question any live server of
its kind answers: ``probe_question``) after
``BACKOFF_MIN_S``, doubling up to ``BACKOFF_MAX_S`` while it keeps failing; once it answers it
is up again and, being earlier in the list, takes the new flows back. When every proxy is
down, flows still try them all in order: one that works is up again at once.

The list may mix SOCKS5 and HTTP CONNECT proxies (each entry's dialer speaks its scheme).

Everything that holds "the" SOCKS5 dialer follows the active proxy: this class is a
``Socks5Dialer`` whose ``proxy`` is the active proxy's endpoint (DNS upstreams over TCP dial
through it; UDP associations are opened with ``proxy`` read at that moment).

``FailoverState`` is the bookkeeping, pure (time is an argument); ``FailoverDialer`` the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from tun2socks.net.events import FlowRequested
from tun2socks.outbound import socks5
from tun2socks.outbound.dialer import FirstDataOffer, Socks5Dialer

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_S = 3.0  # per proxy while another is left; the last one gets connect_timeout
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 5.0
PROBE_TIMEOUT_S = 2.0
GREETING = b"\x05\x01\x00"  # RFC 1928 section 3: version 5, one method, "no authentication"


def probe_question(proxy: socks5.ProxyEndpoint) -> tuple[bytes, Callable[[bytes], bool]]:
    """What the probe sends to `proxy` and how it judges the first bytes of the answer.

    SOCKS5: the greeting; alive when the answer's version is 5. HTTP: ``OPTIONS *``, which
    concerns the server itself and is never forwarded (RFC 9110 section 9.3.7, RFC 9112
    section 3.2.4): no CONNECT, nothing leaves the proxy; alive when any status line comes
    back (tinyproxy says 400, an authenticating proxy 407: both are alive)."""
    if proxy.scheme == "http":
        host = socks5.format_host_port(proxy.host, proxy.port)
        request = f"OPTIONS * HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        return request.encode("ascii", "replace"), _is_http_status_line
    return GREETING, lambda answer: answer[:1] == b"\x05"


def _is_http_status_line(answer: bytes) -> bool:
    return answer.startswith(b"HTTP/1.") and len(answer) >= 12 and answer[9:12].isdigit()


@dataclass
class ProxyHealth:
    label: str  # host:port, for messages (never the credentials)
    up: bool = True
    failures: int = 0  # connects that failed, since start
    probes: int = 0  # probes sent while down
    last_change: float = 0.0  # wall-clock time of the last up/down change (0: never)
    last_error: str = ""
    backoff: float = BACKOFF_MIN_S


class FailoverState:
    """Which proxies are up, in the configured order; pure."""

    def __init__(self, labels: Sequence[str]) -> None:
        if not labels:
            raise ValueError("failover needs at least one proxy")
        self.proxies = [ProxyHealth(label) for label in labels]

    def order(self) -> list[int]:
        """The proxies to try, best first: those up in the configured order, then the rest."""
        up = [i for i, p in enumerate(self.proxies) if p.up]
        return up + [i for i, p in enumerate(self.proxies) if not p.up]

    @property
    def active(self) -> int:
        return self.order()[0]

    def failed(self, index: int, error: str, now: float) -> bool:
        """A connect through `index` failed; True when that takes it down (it was up)."""
        proxy = self.proxies[index]
        proxy.failures += 1
        proxy.last_error = error
        if not proxy.up:
            return False
        proxy.up = False
        proxy.last_change = now
        proxy.backoff = BACKOFF_MIN_S
        return True

    def succeeded(self, index: int, now: float) -> bool:
        """`index` worked (a flow or a probe); True when that brings it back up."""
        proxy = self.proxies[index]
        if proxy.up:
            return False
        proxy.up = True
        proxy.last_change = now
        proxy.backoff = BACKOFF_MIN_S
        return True

    def next_probe_delay(self, index: int) -> float:
        """How long to wait before probing `index` again; doubles each time (bounded)."""
        proxy = self.proxies[index]
        delay = proxy.backoff
        proxy.backoff = min(proxy.backoff * 2, BACKOFF_MAX_S)
        proxy.probes += 1
        return delay

    def stats(self) -> dict[str, int]:
        """For /stats, /metrics and `tun2socks status`: pN_* per proxy, in configured order."""
        found = {"active": self.active, "up": sum(p.up for p in self.proxies)}
        for index, proxy in enumerate(self.proxies):
            found[f"p{index}_up"] = int(proxy.up)
            found[f"p{index}_failures"] = proxy.failures
            found[f"p{index}_probes"] = proxy.probes
            found[f"p{index}_last_change_unix"] = int(proxy.last_change)
        return found


class FailoverDialer(Socks5Dialer):
    """A Socks5Dialer over several proxies, the active one first (see the module doc)."""

    def __init__(
        self, dialers: Sequence[Socks5Dialer], wall_clock: Callable[[], float] = time.time
    ) -> None:
        # No super().__init__(): `proxy` is the active dialer's, a property here.
        self.dialers = list(dialers)
        self.state = FailoverState([d.proxy.address for d in self.dialers])
        first = self.dialers[0]
        self.timeout = first.timeout
        self.prepare_socket = first.prepare_socket
        self.pipeline = first.pipeline
        self._wall_clock = wall_clock
        self._probes: dict[int, asyncio.Task[None]] = {}

    @property
    def proxy(self) -> socks5.ProxyEndpoint:
        return self.dialers[self.state.active].proxy

    @proxy.setter
    def proxy(self, value: socks5.ProxyEndpoint) -> None:
        raise AttributeError("the failover dialer's proxy is the active one; it is not set")

    def stats(self) -> dict[str, int]:
        return self.state.stats()

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        return await self.dial_host(flow.dst, flow.dst_port, offer=offer)

    async def dial_host(
        self,
        host: str | IPv4Address | IPv6Address,
        port: int,
        *,
        offer: FirstDataOffer | None = None,
    ) -> socket.socket:
        order = self.state.order()
        last_error: Exception | None = None
        for position, index in enumerate(order):
            dialer = self.dialers[index]
            wait = dialer.timeout
            if position < len(order) - 1:
                wait = min(wait, ATTEMPT_TIMEOUT_S)
            try:
                sock = await asyncio.wait_for(dialer.dial_host(host, port, offer=offer), wait)
            except socks5.Socks5ReplyError:
                self._worked(index)  # the proxy answered: the destination is the problem
                raise
            except (socks5.Socks5Error, OSError, TimeoutError) as exc:
                reason = "no connection within {wait:g} s" if isinstance(exc, TimeoutError) else ""
                self._failed(index, reason.format(wait=wait) or str(exc))
                last_error = exc
                continue
            self._worked(index)
            return sock
        assert last_error is not None
        raise last_error

    def _failed(self, index: int, reason: str) -> None:
        if self.state.failed(index, reason, self._wall_clock()):
            nxt = self.state.active
            log.warning(
                "proxy %s is down (%s); now using %s",
                self.state.proxies[index].label,
                reason,
                self.state.proxies[nxt].label,
            )
            if index not in self._probes:
                task = asyncio.get_running_loop().create_task(self._probe_until_up(index))
                self._probes[index] = task

    def _worked(self, index: int) -> None:
        if self.state.succeeded(index, self._wall_clock()):
            log.warning("proxy %s is up again", self.state.proxies[index].label)

    async def _probe_until_up(self, index: int) -> None:
        try:
            while not self.state.proxies[index].up:
                await asyncio.sleep(self.state.next_probe_delay(index))
                if self.state.proxies[index].up:
                    break  # a flow found it working meanwhile
                if await self._probe(self.dialers[index]):
                    self._worked(index)
        finally:
            self._probes.pop(index, None)

    async def _probe(self, dialer: Socks5Dialer) -> bool:
        """A TCP connect and `probe_question` answered as a live proxy of its kind would."""
        loop = asyncio.get_running_loop()
        proxy = dialer.proxy
        question, alive = probe_question(proxy)
        try:
            family = socket.AF_INET6 if ip_address(proxy.host).version == 6 else socket.AF_INET
            address: tuple[str, int] = (proxy.host, proxy.port)
        except ValueError:  # a name: resolve it, as a flow would
            try:
                infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
            except OSError:
                return False
            family, *_, sockaddr = infos[0]
            address = (str(sockaddr[0]), int(sockaddr[1]))
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if dialer.prepare_socket is not None:
                dialer.prepare_socket(sock)
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await loop.sock_connect(sock, address)
                await loop.sock_sendall(sock, question)
                answer = await loop.sock_recv(sock, 64)
        except (OSError, TimeoutError):
            return False
        finally:
            sock.close()
        return alive(answer)

    async def close(self) -> None:
        for task in list(self._probes.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._probes.clear()
