"""The engine: drives the stack from the TUN device and the relays from the stack's events.

Packets read from the TUN are fed to the stack in batches; its events open upstream
connections and move bytes; after each batch (and after upstream I/O, once per loop
iteration) the stack's output is written to the TUN and its single timer is re-armed
(`_transmit`, as in aioquic's asyncio layer).

Everything the engine works with is given to its constructor (`app.py` builds it all):
the stack, the device, the loop and the `Collaborators` (the dialer for TCP flows, the
handlers of UDP datagrams, the domain lookup, the counters shown by the API). The UDP
handlers write to clients through a `DatagramPort`, which they get before the engine exists.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tun2socks.net.events import (
    DatagramReceived,
    DataReceived,
    EofReceived,
    FlowEnded,
    FlowRequested,
    FlowReset,
    IPAddress,
    SendSpaceAvailable,
)
from tun2socks.outbound.dialer import (
    Dialer,
    DialError,
    FirstDataOffer,
    PendingConnect,
)
from tun2socks.outbound.known_destinations import KnownDestinations
from tun2socks.outbound.socks5 import Socks5Error, Socks5SessionLost
from tun2socks.pending_connect import ReplyWaiter
from tun2socks.relay import Relay

if TYPE_CHECKING:
    from tun2socks.device import TunDevice
    from tun2socks.net.stack import Stack

log = logging.getLogger("tun2socks")

StatsSource = Callable[[], Mapping[str, int]]
DomainLookup = Callable[[IPAddress], "str | None"]


class DatagramHandler(Protocol):
    """Takes the UDP datagrams clients send into the TUN (the DNS forwarder, the UDP relay)."""

    def datagram_received(self, datagram: DatagramReceived) -> None: ...


def no_domain(address: IPAddress) -> str | None:
    """The domain lookup without the DNS forwarder: no address stands for a name."""
    return None


class DatagramPort:
    """The clients' side of UDP for datagram handlers, which exist before the engine.

    What they send is written to the TUN at the end of this loop iteration: the engine
    waits on `wakeup` (set here) and then flushes the stack.
    """

    def __init__(self, stack: Stack, loop: asyncio.AbstractEventLoop) -> None:
        self._stack = stack
        self._loop = loop
        self.wakeup = asyncio.Event()

    def time(self) -> float:
        return self._loop.time()

    def send_datagram(
        self, src: IPAddress, src_port: int, dst: IPAddress, dst_port: int, payload: bytes
    ) -> None:
        """A UDP datagram to a client (`dst`) from the address it wrote to (`src`). Raises
        ValueError if no IP packet can carry it, or the address families differ."""
        self._stack.send_datagram(src, src_port, dst, dst_port, payload)
        self.wakeup.set()

    def refuse_datagram(self, datagram: DatagramReceived, *, mtu: int | None = None) -> None:
        """Answer a client's datagram that cannot be carried with an ICMP error (see
        `Stack.refuse_datagram`: port unreachable, or packet too big with `mtu`)."""
        self._stack.refuse_datagram(datagram, self._loop.time(), mtu=mtu)
        self.wakeup.set()


@dataclass(frozen=True, slots=True)
class Collaborators:
    """What the engine hands its work to.

    `dialer` opens the upstream of each TCP flow; `udp_by_port[port]` takes UDP to that
    destination port, `udp` the rest; `domain_lookup` maps a destination address to the
    name it was resolved from, if known; `stats_sources[name]()` returns a component's
    counters for the API and metrics; `proxy_address` names the default proxy in logs;
    `known_destinations`, when given (``proxy.early_accept``), lets flows to destinations
    that connected moments ago get their SYN-ACK before their upstream is connected.
    """

    dialer: Dialer
    udp: DatagramHandler
    udp_by_port: Mapping[int, DatagramHandler] = field(default_factory=dict)
    domain_lookup: DomainLookup = no_domain
    stats_sources: Mapping[str, StatsSource] = field(default_factory=dict)
    proxy_address: str = ""
    known_destinations: KnownDestinations | None = None


class Engine:
    """Owns the relays; drives them and the stack from the loop.

    Read by the API (never assigned from outside): `stack`, `device`, `loop`, `relays`,
    `upstream_errors` (flows refused, by cause), `finished_bytes_up` / `_down` (of relays
    that are gone), `domain_lookup`, `stats_sources`, `proxy_address`.
    """

    def __init__(
        self,
        stack: Stack,
        device: TunDevice,
        loop: asyncio.AbstractEventLoop,
        port: DatagramPort,
        parts: Collaborators,
    ) -> None:
        self.stack = stack
        self.device = device
        self.loop = loop
        self._port = port
        self._dialer = parts.dialer
        self._udp = parts.udp
        self._udp_by_port = dict(parts.udp_by_port)
        self.domain_lookup = parts.domain_lookup
        self.stats_sources: Mapping[str, StatsSource] = {
            "ip": stack.ip_stats,
            **parts.stats_sources,
        }
        self.proxy_address = parts.proxy_address
        self._known = known = parts.known_destinations
        if known is not None:
            self.stats_sources = {**self.stats_sources, "early_accept": known.stats}
        self.relays: dict[int, Relay] = {}
        self.upstream_errors: Counter[str] = Counter()
        self.finished_bytes_up = self.finished_bytes_down = 0
        self._flush_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._datagram_flusher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.device.start(self.loop, self.on_packets)
        self._datagram_flusher = self.loop.create_task(self._flush_datagrams())

    # ---------------------------------------------------------------- the loop's entry points

    def on_packets(self, batch: list[tuple[bytes, bool]]) -> None:
        now = self.loop.time()
        receive = self.stack.receive_packet
        for packet, checksum_trusted in batch:
            receive(packet, now, checksum_trusted)
        self._transmit()

    def schedule_flush(self) -> None:
        """Flush once at the end of this loop iteration, so that writes coalesce."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._transmit)

    def flush(self) -> None:
        """Write the stack's output now: for what is on a client's critical path (an answer
        from upstream), where the turn of the loop that `schedule_flush` waits for costs."""
        self._transmit()

    async def _flush_datagrams(self) -> None:
        wakeup = self._port.wakeup
        while True:
            await wakeup.wait()
            wakeup.clear()
            self._transmit()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline = None
        self.stack.handle_timer(self.loop.time())
        self._transmit()

    def _transmit(self) -> None:
        """Handle the stack's events, write its packets, re-arm its timer."""
        self._flush_pending = False
        stack = self.stack
        while True:
            self._handle_events()
            packets = stack.packets_to_send(self.loop.time())
            if packets:
                self.device.write(packets)
            # Output can only raise events through the API calls of event handlers.
            if not stack.has_events:
                break
        deadline = stack.get_timer()
        if deadline != self._timer_deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer) if deadline else None
            self._timer_deadline = deadline

    def _handle_events(self) -> None:
        stack = self.stack
        relays = self.relays
        while (event := stack.next_event()) is not None:
            if isinstance(event, DataReceived | EofReceived):
                relay = relays.get(event.flow_id)
                if relay is not None:
                    relay.pump_to_upstream()
            elif isinstance(event, SendSpaceAvailable):
                relay = relays.get(event.flow_id)
                if relay is not None:
                    relay.send_space_available()
            elif isinstance(event, FlowRequested):
                self._open(event)
            elif isinstance(event, DatagramReceived):
                self._udp_by_port.get(event.dst_port, self._udp).datagram_received(event)
            elif isinstance(event, FlowEnded):
                relay = relays.get(event.flow_id)
                if relay is not None:
                    relay.flow_ended()
            elif isinstance(event, FlowReset):
                relay = relays.get(event.flow_id)
                if relay is not None:
                    relay.flow_reset(event.reason)

    # ---------------------------------------------------------------- flows

    def _open(self, flow: FlowRequested) -> None:
        relay = Relay(self, flow)
        self.relays[flow.flow_id] = relay
        relay.connect_task = self.loop.create_task(self._connect(relay))

    async def _connect(self, relay: Relay, redial: bool = False) -> None:
        flow = relay.flow
        known = self._known
        destination = (flow.dst, flow.dst_port)
        # A destination that connected moments ago (opt-in): SYN-ACK at once, dial meanwhile;
        # the client's first data waits in the stack's receive buffer, or, on a ready pooled
        # session of a proxy that takes pipelined messages, goes right behind the CONNECT
        # (`offer`: dialer.py, pending_connect.py). Any other keeps the SYN-ACK-after-connect
        # rule, so that a refusal is a clean RST. `redial`: an early flow dialed again.
        early = redial or (known is not None and known.is_known(destination, self.loop.time()))
        offer = None
        if early and not redial:
            assert known is not None
            known.counters.accepted += 1
            self.stack.accept(flow.flow_id, self.loop.time())
            self._transmit()
            offer = FirstDataOffer()
        try:
            sock = await self._dialer.dial(flow, offer=offer)
        except (Socks5Error, DialError) as exc:
            self._refuse(relay, str(exc), exc.kind, early)
            return
        except (OSError, ValueError) as exc:
            self._refuse(relay, f"cannot connect upstream: {exc}", "connect_failed", early)
            return
        pending = offer.pending if offer is not None else None
        if known is not None and pending is None:
            known.connected(destination, self.loop.time())
        if flow.flow_id not in self.relays:  # the client gave up meanwhile
            sock.close()
            return
        if not early:
            # The SYN-ACK now, before the transport exists: making it takes two more loop
            # turns (connection_made and the waiter are scheduled with call_soon), and the
            # SYN-ACK is on the client's critical path. What the client sends meanwhile waits
            # in the stack's receive buffer (pump_to_upstream does nothing without a transport).
            self.stack.accept(flow.flow_id, self.loop.time())
            self._transmit()
        protocol: asyncio.Protocol = relay
        if pending is not None:  # the CONNECT's reply is due: read in front of the relay
            assert known is not None
            known.counters.pipelined += 1
            protocol = ReplyWaiter(self, relay, pending, self.loop)
        try:
            await self.loop.create_connection(lambda: protocol, sock=sock)
        except OSError as exc:  # not a stream socket: a bug of a dialer, never seen
            sock.close()
            self._refuse(relay, f"upstream socket failed: {exc}", "socket_failed", early)
            return
        if relay.finished:  # reset while the transport was made
            relay.close_transport()
            return
        if log.isEnabledFor(logging.DEBUG):  # describe() formats addresses: not per flow
            log.debug("%s: connected through %s", relay.describe(), self.proxy_address)
        relay.pump_to_upstream()  # the client's data sent meanwhile (or from the SYN cache)
        self._transmit()

    def reply_arrived(self, relay: Relay) -> None:
        """A pipelined flow's CONNECT succeeded (pending_connect.py); its upstream is the
        relay's from now on."""
        known = self._known
        assert known is not None
        flow = relay.flow
        known.connected((flow.dst, flow.dst_port), self.loop.time())
        if relay.bytes_up:  # the client's data indeed left before the reply
            known.counters.pipelined_first_data += 1

    def reply_failed(self, relay: Relay, pending: PendingConnect, error: Socks5Error) -> None:
        """A pipelined flow got no connection. A session that was dead (no reply byte at all)
        is dialed afresh when none of the client's data went out on it, unseen by the client;
        otherwise, as after any early SYN-ACK, the flow is reset: the data may have reached
        the proxy, and sending it again could deliver it twice."""
        if isinstance(error, Socks5SessionLost) and not relay.bytes_up:
            assert self._known is not None
            self._known.counters.pipelined_redialed += 1
            pending.session_lost()
            relay.forget_transport()
            relay.connect_task = self.loop.create_task(self._connect(relay, redial=True))
            return
        relay.close_transport()
        reason = str(error)
        if isinstance(error, Socks5SessionLost):
            reason += "; the client's first data had gone out on it"
        self._refuse(relay, reason, error.kind, early=True)

    def _refuse(self, relay: Relay, reason: str, kind: str, early: bool = False) -> None:
        """The upstream could not be opened: one log line, RST to the client (a reset of the
        connection if it was accepted early), the destination no longer known."""
        after = " (reset after an early SYN-ACK)" if early else ""
        log.warning("%s: %s%s", relay.describe(), reason, after)
        self.upstream_errors[kind] += 1
        if self._known is not None:
            self._known.failed((relay.flow.dst, relay.flow.dst_port))
            if early:
                self._known.counters.reset += 1
        self.stack.reject(relay.flow_id)
        self.relay_finished(relay)
        self.schedule_flush()

    def relay_finished(self, relay: Relay) -> None:
        if self.relays.pop(relay.flow_id, None) is not None:
            self.finished_bytes_up += relay.bytes_up
            self.finished_bytes_down += relay.bytes_down
            if log.isEnabledFor(logging.DEBUG):  # describe() is not free: not per flow
                log.debug(
                    "%s: done, %d bytes up, %d down",
                    relay.describe(),
                    relay.bytes_up,
                    relay.bytes_down,
                )

    def close_flow(self, flow_id: int) -> bool:
        """Reset one flow (the API's close button): RST to the client, upstream dropped.
        False if there is no such open flow."""
        relay = self.relays.get(flow_id)
        if relay is None:
            return False
        log.info("%s: closed through the API", relay.describe())
        relay.abort()
        self.schedule_flush()
        return True

    def close(self) -> None:
        """Reset every flow, send the RSTs, release the upstreams."""
        if self._datagram_flusher is not None:
            self._datagram_flusher.cancel()
        for relay in list(self.relays.values()):
            relay.abort()
        self.stack.close_all()
        packets = self.stack.packets_to_send(self.loop.time())
        if packets:
            self.device.write(packets)
        self.device.drain()  # the RSTs are written before close() returns; no thread is left
        if self._timer is not None:
            self._timer.cancel()
