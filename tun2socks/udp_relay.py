"""The UDP relay: the engine's default datagram handler, carrying UDP through SOCKS5.

Theory of operation
-------------------
Each client source endpoint (address, port) gets one session in the NAT table
(`net/udp_nat.py`) and one SOCKS5 UDP association (`outbound/socks5_udp.py`), or with
`direct://` one protected UDP socket of its own (`outbound/direct_udp.py`), whatever the
destinations: endpoint-independent mapping, so replies from any remote address and port
reach the client socket (games, VoIP, QUIC connection migration, STUN). Datagrams that
arrive while the association is being set up wait in a small bounded queue.

Client -> remote: `datagram_received` (a `DatagramReceived` event from the stack) sends the
payload through the session's association, addressed to the event's destination.
Remote -> client: the association calls back with the remote peer; the reply goes into the
TUN with `port.send_datagram(src=remote, dst=client)` (the engine's `DatagramPort`).

A session ends when it has been idle (no datagram either way) for `udp.idle_timeout`, when
its association's control connection closes (RFC 1928 section 7: the association dies with
it), or when the table is full and it is the least recently used.

When the proxy refuses UDP ASSOCIATE (microsocks answers "command not supported") or
cannot be reached, one warning is logged and datagrams are refused as `udp.when_unsupported`
says: ICMP port unreachable (the application fails at once) or a silent drop. A refusing
proxy is asked again after `UNSUPPORTED_RETRY` seconds, in case it was reconfigured. DNS
never gets here while the DNS forwarder has its own handler for port 53.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Protocol

from tun2socks.net.events import DatagramReceived
from tun2socks.net.udp_nat import Endpoint, UdpNat
from tun2socks.outbound.direct_udp import DirectUdpAssociation, open_direct_udp
from tun2socks.outbound.socks5 import ProxyEndpoint, Socks5Error, Socks5ReplyError
from tun2socks.outbound.socks5_udp import DatagramTooLarge, UdpAssociation, associate
from tun2socks.rules import Action, Decision

if TYPE_CHECKING:
    from tun2socks.config import UdpConfig

log = logging.getLogger("tun2socks.udp")

IPAddress = IPv4Address | IPv6Address
SocketHook = Callable[[socket.socket], None]

UNSUPPORTED_RETRY = 60.0  # seconds before a proxy that refused UDP ASSOCIATE is asked again
PENDING_DATAGRAMS = 64  # per session, while its association is being set up
PENDING_BYTES = 256 * 1024
REOPEN_GRACE = 5.0  # seconds an association replaced by reopen() still delivers replies
_LIMITED_BROADCAST = IPv4Address("255.255.255.255")


Decide = Callable[[IPAddress, int, str], Decision]


class ClientPort(Protocol):
    """How the relay answers clients (`engine.DatagramPort`)."""

    def send_datagram(
        self, src: IPAddress, src_port: int, dst: IPAddress, dst_port: int, payload: bytes
    ) -> None: ...

    def refuse_datagram(self, datagram: DatagramReceived, *, mtu: int | None = None) -> None: ...


@dataclass(eq=False, slots=True)
class _Session:
    client: IPAddress
    client_port: int
    association: UdpAssociation | DirectUdpAssociation | None = None
    pending: list[DatagramReceived] = field(default_factory=list)
    pending_bytes: int = 0
    task: asyncio.Task[None] | None = None
    closed: bool = False

    @property
    def key(self) -> Endpoint:
        return (self.client, self.client_port)

    def describe(self) -> str:
        host = f"[{self.client}]" if self.client.version == 6 else str(self.client)
        return f"udp {host}:{self.client_port}"


class UdpRelay:
    """All UDP sessions of one engine: the engine's handler of UDP to any other port.

    `proxy` carries the datagrams (`timeout`: for setting up an association); `decide` is
    the rules' decision for a destination, None without rules (only `block` is applied).
    """

    def __init__(
        self,
        config: UdpConfig,
        proxy: Callable[[], ProxyEndpoint],
        port: ClientPort,
        loop: asyncio.AbstractEventLoop,
        *,
        timeout: float,
        prepare_socket: SocketHook | None = None,
        decide: Decide | None = None,
    ) -> None:
        self.proxy = proxy  # read at each association: it follows failover
        self.port = port
        self.loop = loop
        self.decide = decide
        self.enabled = config.enabled
        self.refuse_with_icmp = config.when_unsupported == "unreachable"
        self.timeout = timeout
        # Protects the sockets to the proxy from routing back into the TUN (SO_MARK, ...).
        self.prepare_socket = prepare_socket
        self.nat: UdpNat[_Session] = UdpNat(config.max_sessions, config.idle_timeout)
        self.counters: Counter[str] = Counter()
        self._unsupported_until = 0.0
        self._warned_unsupported = False
        self._last_failure_log = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        # Ports of our own direct sockets when unprotected (direct:// with no route.mark or
        # route.bind_interface): routes made by hand may send them into the TUN, where each
        # datagram would open a session that sends it again, forever. Dropped instead.
        self.own_ports: set[int] = set()

    @property
    def proxy_carries_udp(self) -> bool:
        """An HTTP proxy has CONNECT only (RFC 9110 section 9.3.6): no UDP, whatever we ask.
        Read each time: a failover list may mix HTTP and SOCKS5 proxies."""
        return self.proxy().scheme != "http"

    # ---------------------------------------------------------------- client -> remote

    def datagram_received(self, datagram: DatagramReceived) -> None:
        now = self.loop.time()
        dst = datagram.dst
        if dst.is_multicast or dst.is_unspecified or dst == _LIMITED_BROADCAST:
            self.counters["dropped_not_unicast"] += 1  # a proxy cannot carry these
            return
        if datagram.src_port in self.own_ports:
            self.counters["dropped_own_loop"] += 1
            if self.counters["dropped_own_loop"] == 1:
                log.warning(
                    "UDP from tun2socks itself entered the TUN and is dropped: route its "
                    "destinations around the TUN, or set route.mark or route.bind_interface"
                )
            return
        if not self.enabled:
            self._warn_unsupported("udp.enabled is false")
            self._refuse(datagram)
            return
        if not self.proxy_carries_udp:
            self._warn_unsupported("the proxy is an HTTP proxy, whose CONNECT carries TCP only")
            self._refuse(datagram)
            return
        if self._blocked(datagram):
            self.counters["refused_by_rule"] += 1
            self.port.refuse_datagram(datagram)
            return
        if now < self._unsupported_until:
            self._refuse(datagram)
            return
        session = self.nat.touch((datagram.src, datagram.src_port), now)
        if session is None:
            session = self._open(datagram, now)
        association = session.association
        if association is None:
            if len(session.pending) < PENDING_DATAGRAMS and (
                session.pending_bytes + len(datagram.payload) <= PENDING_BYTES
            ):
                session.pending.append(datagram)
                session.pending_bytes += len(datagram.payload)
            else:
                self.counters["dropped_pending_full"] += 1
            return
        self._send(session, association, datagram)

    def _send(
        self,
        session: _Session,
        association: UdpAssociation | DirectUdpAssociation,
        datagram: DatagramReceived,
    ) -> None:
        try:
            sent = association.send(datagram.dst, datagram.dst_port, datagram.payload)
        except DatagramTooLarge as exc:
            # Too big for one datagram to the relay: tell the client the size that fits.
            ip_header = 20 if datagram.src.version == 4 else 40
            mtu = exc.max_payload + 8 + ip_header
            log.debug("%s: %s", session.describe(), exc)
            self.counters["refused_too_big"] += 1
            self.port.refuse_datagram(datagram, mtu=mtu)
            return
        self.counters["datagrams_up" if sent else "dropped_proxy_busy"] += 1

    def _blocked(self, datagram: DatagramReceived) -> bool:
        """Whether a `block` rule matches. `direct` and named proxies are not applied to UDP
        yet: it goes through the default proxy."""
        if self.decide is None:
            return False
        return self.decide(datagram.dst, datagram.dst_port, "udp").action is Action.BLOCK

    # ---------------------------------------------------------------- sessions

    def _open(self, datagram: DatagramReceived, now: float) -> _Session:
        session = _Session(datagram.src, datagram.src_port)
        for _key, evicted in self.nat.add(session.key, session, now):
            log.debug("%s: closed to make room (udp.max_sessions)", evicted.describe())
            self._close(evicted)
        self.counters["sessions_total"] += 1
        session.task = self.loop.create_task(self._associate(session))
        self._arm_timer()
        return session

    async def _associate(self, session: _Session) -> None:
        proxy = self.proxy()

        def on_datagram(host: str, port: int, data: bytes) -> None:
            self._reply(session, host, port, data)

        def on_close(reason: str) -> None:
            self._association_closed(session, reason)

        association: UdpAssociation | DirectUdpAssociation
        try:
            if proxy.scheme == "direct":  # the bypass mode: a protected socket, no proxy
                association = await open_direct_udp(
                    session.client.version,
                    prepare_socket=self.prepare_socket,
                    on_datagram=on_datagram,
                    on_close=on_close,
                    own_ports=None if self.prepare_socket else self.own_ports,
                )
            else:
                association = await associate(
                    proxy,
                    timeout=self.timeout,
                    prepare_socket=self.prepare_socket,
                    on_datagram=on_datagram,
                    on_close=on_close,
                )
        except (Socks5Error, OSError) as exc:
            self._association_failed(session, exc)
            return
        finally:
            if session.task is asyncio.current_task():  # not replaced by reopen()
                session.task = None
        if session.closed:
            association.close()
            return
        log.debug("%s: associated, relay %s", session.describe(), association.relay)
        session.association = association
        pending, session.pending, session.pending_bytes = session.pending, [], 0
        for datagram in pending:
            self._send(session, association, datagram)

    def _association_failed(self, session: _Session, exc: Exception) -> None:
        now = self.loop.time()
        self.counters["associate_failed"] += 1
        if isinstance(exc, Socks5ReplyError):
            # The proxy answered and said no: it has no UDP for us. Stop asking for a while.
            self._unsupported_until = now + UNSUPPORTED_RETRY
            self._warn_unsupported(str(exc))
        elif now - self._last_failure_log >= 10.0:  # one line per burst of failures
            self._last_failure_log = now
            where = "directly" if self.proxy().scheme == "direct" else "through the proxy"
            log.warning("%s: cannot set up UDP %s: %s", session.describe(), where, exc)
        self.nat.remove(session.key, session)
        session.closed = True
        for datagram in session.pending:
            self._refuse(datagram)
        session.pending = []

    def _warn_unsupported(self, why: str) -> None:
        """One warning, the first time UDP cannot be carried; later ones at debug level."""
        if self._warned_unsupported:
            log.debug("UDP is not carried: %s", why)
            return
        self._warned_unsupported = True
        action = "answered with ICMP port unreachable" if self.refuse_with_icmp else "dropped"
        asks_again = self.enabled and self.proxy_carries_udp
        retry = f"; the proxy is asked again after {UNSUPPORTED_RETRY:g} s" if asks_again else ""
        log.warning(
            "UDP is not carried: %s. UDP datagrams (other than DNS to the forwarder) are %s "
            "(udp.when_unsupported)%s",
            why,
            action,
            retry,
        )

    def _refuse(self, datagram: DatagramReceived) -> None:
        if self.refuse_with_icmp:
            self.counters["refused_unreachable"] += 1
            self.port.refuse_datagram(datagram)
        else:
            self.counters["dropped_unsupported"] += 1

    def _association_closed(self, session: _Session, reason: str) -> None:
        log.debug("%s: association ended: %s", session.describe(), reason)
        self.counters["sessions_ended_by_proxy"] += 1
        self.nat.remove(session.key, session)
        session.closed = True

    def _close(self, session: _Session) -> None:
        session.closed = True
        session.pending = []
        if session.association is not None:
            session.association.close()
        if session.task is not None:
            session.task.cancel()

    # ---------------------------------------------------------------- remote -> client

    def _reply(self, session: _Session, host: str, port: int, payload: bytes) -> None:
        try:
            remote: IPAddress = ip_address(host)
        except ValueError:
            self.counters["dropped_reply_not_address"] += 1
            return
        client = session.client
        if remote.version != client.version:
            mapped = remote.ipv4_mapped if isinstance(remote, IPv6Address) else None
            if mapped is None or client.version != 4:
                self.counters["dropped_reply_family"] += 1
                return
            remote = mapped
        self.nat.touch(session.key, self.loop.time())
        try:
            self.port.send_datagram(remote, port, client, session.client_port, payload)
        except ValueError:  # larger than an IP packet can carry
            self.counters["dropped_reply_too_big"] += 1
            return
        self.counters["datagrams_down"] += 1

    # ---------------------------------------------------------------- idle expiry

    def _arm_timer(self) -> None:
        deadline = self.nat.deadline
        if self._timer is None and deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for _key, session in self.nat.expire(self.loop.time()):
            log.debug("%s: idle, closed", session.describe())
            self._close(session)
        # Refreshed sessions only moved their deadlines later: re-arm for the earliest.
        self._arm_timer()

    # ---------------------------------------------------------------- the engine's side

    def reopen(self) -> int:
        """The path out of the host changed (tun2socks.path_watch): every session gets a new
        association by the new path (its datagrams wait in its queue meanwhile). An old one
        may be bound to an address that is gone, or leave by an uplink whose address is not
        its own (dropped by reverse-path filters and NATs on the way); it still delivers the
        replies on their way for REOPEN_GRACE seconds, then closes. A proxy that refused UDP
        is asked again. How many sessions were reopened."""
        reopened = 0
        for _key, session in list(self.nat):
            old, session.association = session.association, None
            if old is not None:
                old.on_close = None  # its end no longer ends the session
                self.loop.call_later(REOPEN_GRACE, old.close)
            if session.task is not None:
                session.task.cancel()  # opening by the old path
            session.task = self.loop.create_task(self._associate(session))
            reopened += 1
        self._unsupported_until = 0.0
        if reopened:
            self.counters["sessions_reopened"] += reopened
            log.info("network changed: %d UDP sessions get new associations", reopened)
        return reopened

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self.nat), **self.counters}

    def close(self) -> None:
        """Close every session (the program stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for key, session in list(self.nat):
            self.nat.remove(key)
            self._close(session)
