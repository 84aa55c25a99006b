"""Is the proxy reachable? A quiet background probe, so that a missing proxy is said at start-up
and its return is said when it happens, not when the first flow fails.

Theory of operation
-------------------
A probe is what the data path would do first: a TCP connect to the proxy on a protected
socket (the same ``route.mark`` / ``route.bind_interface`` hook as every outbound socket),
then for SOCKS5 a greeting (RFC 1928 section 3) whose answer must start with version 5; any
method choice, even "no acceptable methods", proves a SOCKS5 server is there. An HTTP proxy
gets the TCP connect only (a CONNECT would ask it to reach somewhere).

The first probe runs at start-up with a short timeout, before the start-up summary, which
reports its result; an unreachable proxy gets one warning at once. Then ``ProxyProber`` keeps
probing in the background: while the proxy is unreachable after ``PROBE_MIN_S``, doubling up
to ``PROBE_MAX_S``; while it is reachable every ``PROBE_MAX_S``. Only changes are logged: one
line when it becomes reachable again, one when it goes away again.

``ReachabilityState`` is the bookkeeping, pure; ``ProxyProber`` and ``probe_proxy`` the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from dataclasses import dataclass
from ipaddress import ip_address

from tun2socks.outbound.socks5 import ProxyEndpoint, SocketHook
from tun2socks.outbound.socks5_wire import SOCKS_VERSION, AuthMethod, build_greeting

PROBE_MIN_S = 1.0  # the first retry after the proxy went away
PROBE_MAX_S = 30.0  # the bound of the backoff, and the interval while the proxy answers
FIRST_PROBE_TIMEOUT_S = 1.5  # at start-up: the summary waits for it
PROBE_TIMEOUT_S = 5.0


class Change(enum.Enum):
    """What a probe result changed."""

    FIRST_REACHABLE = "first_reachable"
    FIRST_UNREACHABLE = "first_unreachable"
    REACHABLE_AGAIN = "reachable_again"
    WENT_AWAY = "went_away"


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    detail: str  # "answered a probe in 0.4 ms" or the cause, e.g. "connection refused"


class ReachabilityState:
    """The proxy's reachability as the probes saw it, and when to probe next; pure."""

    def __init__(self) -> None:
        self.reachable: bool | None = None  # None: not probed yet
        self.probes = 0
        self.changes = 0
        self._delay = PROBE_MIN_S

    def record(self, reachable: bool) -> Change | None:
        """One probe's result; the change it makes, or None when nothing changed."""
        previous, self.reachable = self.reachable, reachable
        self.probes += 1
        if reachable:
            self._delay = PROBE_MAX_S
        elif previous is not False:
            self._delay = PROBE_MIN_S  # just went away: look again soon
        else:
            self._delay = min(self._delay * 2, PROBE_MAX_S)
        if previous is None:
            return Change.FIRST_REACHABLE if reachable else Change.FIRST_UNREACHABLE
        if previous == reachable:
            return None
        self.changes += 1
        return Change.REACHABLE_AGAIN if reachable else Change.WENT_AWAY

    def next_delay(self) -> float:
        """Seconds until the next probe."""
        return self._delay

    def stats(self) -> dict[str, int]:
        return {
            "reachable": int(bool(self.reachable)),
            "probes": self.probes,
            "changes": self.changes,
        }


async def probe_proxy(
    proxy: ProxyEndpoint, *, timeout: float, prepare_socket: SocketHook | None
) -> ProbeResult:
    """One probe (see the module doc); never raises for network errors."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            family, address = await _proxy_address(proxy)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            if prepare_socket is not None:
                prepare_socket(sock)
            await loop.sock_connect(sock, address)
            if proxy.scheme == "socks5":
                with_auth = proxy.username is not None
                method = AuthMethod.USERNAME_PASSWORD if with_auth else AuthMethod.NO_AUTHENTICATION
                await loop.sock_sendall(sock, build_greeting([method]))
                answer = await loop.sock_recv(sock, 2)
                if not answer:
                    return ProbeResult(False, "it closed the connection without a SOCKS5 answer")
                if answer[0] != SOCKS_VERSION:
                    return ProbeResult(False, f"not a SOCKS5 server (answered {answer[:2]!r})")
    except TimeoutError:
        return ProbeResult(False, f"no answer within {timeout:g} s")
    except OSError as exc:
        return ProbeResult(False, _os_reason(exc))
    finally:
        if sock is not None:
            sock.close()
    return ProbeResult(True, f"answered a probe in {(time.monotonic() - started) * 1000:.1f} ms")


def _os_reason(exc: OSError) -> str:
    """The cause in words: "connection refused", not asyncio's "Connect call failed (...)"."""
    if isinstance(exc, socket.gaierror):  # its errno is an EAI_* code
        return f"cannot resolve the proxy's name: {exc.strerror or exc}"
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__  # our own messages (protect: "needs CAP_NET_ADMIN")


async def _proxy_address(proxy: ProxyEndpoint) -> tuple[int, tuple[str, int]]:
    try:
        ip = ip_address(proxy.host)
    except ValueError:  # a name: resolved as a flow would, each probe (it may move)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {proxy.host}") from None
        family, *_, sockaddr = infos[0]
        return family, (str(sockaddr[0]), int(sockaddr[1]))
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (proxy.host, proxy.port)


class ProxyProber:
    """Probes one proxy at start-up and then in the background; logs only the changes.

    ``label`` names the proxy in messages (its redacted URL, never the password); ``log``
    gets the lines (the start-up warning and the changes).
    """

    def __init__(
        self,
        proxy: ProxyEndpoint,
        label: str,
        *,
        prepare_socket: SocketHook | None,
        log: logging.Logger,
        state: ReachabilityState | None = None,
    ) -> None:
        self.proxy = proxy
        self.label = label
        self.prepare_socket = prepare_socket
        self.log = log
        self.state = state if state is not None else ReachabilityState()
        self._task: asyncio.Task[None] | None = None

    async def first_probe(self) -> ProbeResult:
        """The start-up probe (short timeout); warns at once when the proxy does not answer."""
        result = await probe_proxy(
            self.proxy, timeout=FIRST_PROBE_TIMEOUT_S, prepare_socket=self.prepare_socket
        )
        self._note(self.state.record(result.reachable), result)
        return result

    def start(self) -> None:
        """Keep probing in the background until ``close()``."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def stats(self) -> dict[str, int]:
        return self.state.stats()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.state.next_delay())
            result = await probe_proxy(
                self.proxy, timeout=PROBE_TIMEOUT_S, prepare_socket=self.prepare_socket
            )
            self._note(self.state.record(result.reachable), result)

    def _note(self, change: Change | None, result: ProbeResult) -> None:
        if change is Change.FIRST_UNREACHABLE:
            self.log.warning(
                "proxy %s is unreachable: %s; connections through it fail until it answers "
                "(probing it in the background)",
                self.label,
                result.detail,
            )
        elif change is Change.WENT_AWAY:
            self.log.warning("proxy %s stopped answering: %s", self.label, result.detail)
        elif change is Change.REACHABLE_AGAIN:
            self.log.info("proxy %s is reachable again: %s", self.label, result.detail)
