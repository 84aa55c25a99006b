"""The program: TUN device, stack, relays and SOCKS5 outbound wired on one asyncio loop.

Everything the stack asks for happens here: packets read from the TUN are fed to the
stack in batches; its events open upstream connections and move bytes; after each batch
(and after upstream I/O, once per loop iteration) the stack's output is written to the
TUN and its single timer is re-armed (`_transmit`, as in aioquic's asyncio layer).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from tun2socks.device import DeviceError, TunDevice
from tun2socks.host import privileges
from tun2socks.host import routes as system
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
from tun2socks.net.stack import Stack, StackConfig
from tun2socks.observe import api
from tun2socks.outbound import direct, routing, socks5
from tun2socks.outbound.dialer import Dialer, DialError
from tun2socks.outbound.failover import FailoverDialer
from tun2socks.outbound.socks5_wire import ReplyCode
from tun2socks.path_watch import PathWatch
from tun2socks.relay import Relay
from tun2socks.udp_relay import UdpRelay
from tun2socks_dns.install import install as install_dns

if TYPE_CHECKING:
    from tun2socks.config import Settings

log = logging.getLogger("tun2socks")


class DatagramHandler(Protocol):
    """Takes the UDP datagrams clients send into the TUN (the DNS forwarder, the UDP relay)."""

    def datagram_received(self, datagram: DatagramReceived) -> None: ...


class Engine:
    """Owns the stack and the relays; drives both from the loop.

    Extension points, so that later layers (rules, DNS, UDP relay, API) plug in here:
    `dialer` opens the upstream of each TCP flow (wrap it to add behaviour);
    `datagram_handlers[port]` takes UDP to that destination port, `datagram_handler` the rest;
    `domain_lookup` maps a destination address to the name it was resolved from, if known;
    `stats_sources[name]()` returns a component's counters for the API and metrics.
    """

    def __init__(self, settings: Settings, device: TunDevice, loop: asyncio.AbstractEventLoop):
        self.settings = settings
        self.device = device
        self.loop = loop
        self.stack = Stack(
            StackConfig(
                mtu=device.mtu,
                offload=device.offload,
                recv_buffer=settings.limits.flow_buffer,
                send_buffer=settings.limits.flow_buffer,
                max_flows=settings.limits.max_flows,
                max_half_open=settings.limits.max_half_open,
                idle_timeout=settings.timeouts.idle,
                time_wait=settings.timeouts.time_wait,
                icmp_echo=settings.icmp.echo == "reply",
                reassembly_memory=settings.limits.reassembly_memory,
                reassembly_timeout=settings.limits.reassembly_timeout,
            )
        )
        self._proxy = socks5.ProxyEndpoint.from_config(settings.proxy)
        # Keeps an outbound socket out of the TUN (route.mark / route.bind_interface), or None.
        self.protect_socket = direct.protector(settings.route.mark, settings.route.bind_interface)
        self.failovers: dict[str, FailoverDialer] = {}  # proxy settings that list several URLs
        self.dialer: Dialer = routing.build_dialer(
            settings,
            self.protect_socket,
            lambda address: self.domain_lookup(address),
            self.failovers,
        )
        # UDP through SOCKS5 UDP ASSOCIATE (or refused, as udp.when_unsupported says).
        self.udp_relay = UdpRelay(self, prepare_socket=self.protect_socket)
        self.datagram_handler: DatagramHandler | None = self.udp_relay
        self.datagram_handlers: dict[int, DatagramHandler] = {}
        self.domain_lookup: Callable[[IPAddress], str | None] = lambda _address: None
        self.stats_sources: dict[str, Callable[[], dict[str, int]]] = {}
        self.stats_sources["udp"] = self.udp_relay.stats
        self.stats_sources["ip"] = self.stack.ip_stats
        for name, failover in self.failovers.items():
            self.stats_sources[f"proxy_{name}"] = failover.stats
        self.relays: dict[int, Relay] = {}
        self.upstream_errors: Counter[str] = Counter()  # flows refused, by cause (for the API)
        self.finished_bytes_up = self.finished_bytes_down = 0  # of relays that are gone
        self._flush_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None

    @property
    def proxy(self) -> socks5.ProxyEndpoint:
        """The default proxy; with failover the one in use now (UDP associations follow it)."""
        failover = self.failovers.get("default")
        return failover.proxy if failover is not None else self._proxy

    def start(self) -> None:
        self.device.start(self.loop, self.on_packets)

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
                handler = self.datagram_handlers.get(event.dst_port, self.datagram_handler)
                if handler is not None:
                    handler.datagram_received(event)
                else:
                    stack.drops["udp_unhandled"] += 1
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

    async def _connect(self, relay: Relay) -> None:
        flow = relay.flow
        try:
            sock = await self.dialer.dial(flow)
        except (socks5.Socks5Error, DialError) as exc:
            self._refuse(relay, str(exc), _error_kind(exc))
            return
        except (OSError, ValueError) as exc:
            self._refuse(relay, f"cannot connect upstream: {exc}", "connect_failed")
            return
        if flow.flow_id not in self.relays:  # the client gave up meanwhile
            sock.close()
            return
        try:
            await self.loop.create_connection(lambda: relay, sock=sock)
        except OSError as exc:
            sock.close()
            self._refuse(relay, f"upstream socket failed: {exc}", "socket_failed")
            return
        log.debug("%s: connected through %s", relay.describe(), self.proxy.address)
        self.stack.accept(flow.flow_id, self.loop.time())
        relay.pump_to_upstream()  # a flow from the SYN cache may hold data already
        self._transmit()  # the SYN-ACK now, not an iteration later: it is on the latency path

    def _refuse(self, relay: Relay, reason: str, kind: str) -> None:
        """The upstream could not be opened: one log line, RST to the client."""
        log.warning("%s: %s", relay.describe(), reason)
        self.upstream_errors[kind] += 1
        self.stack.reject(relay.flow_id)
        self.relay_finished(relay)
        self.schedule_flush()

    def send_datagram(
        self, src: IPAddress, src_port: int, dst: IPAddress, dst_port: int, payload: bytes
    ) -> None:
        """A UDP datagram to a client, written at the end of this loop iteration."""
        self.stack.send_datagram(src, src_port, dst, dst_port, payload)
        self.schedule_flush()

    def relay_finished(self, relay: Relay) -> None:
        if self.relays.pop(relay.flow_id, None) is not None:
            self.finished_bytes_up += relay.bytes_up
            self.finished_bytes_down += relay.bytes_down
            log.debug(
                "%s: done, %d bytes up, %d down", relay.describe(), relay.bytes_up, relay.bytes_down
            )

    def close(self) -> None:
        """Reset every flow, send the RSTs, release the upstreams."""
        for relay in list(self.relays.values()):
            relay.abort()
        self.udp_relay.close()
        self.stack.close_all()
        packets = self.stack.packets_to_send(self.loop.time())
        if packets:
            self.device.write(packets)
        if self._timer is not None:
            self._timer.cancel()


def _error_kind(exc: Exception) -> str:
    """The counter key of a refused flow: the SOCKS5 reply, or the kind of failure."""
    if isinstance(exc, socks5.Socks5ReplyError) and exc.reply_code is not None:
        known = exc.reply_code in ReplyCode.__members__.values()
        return ReplyCode(exc.reply_code).name.lower() if known else f"reply_{exc.reply_code}"
    kinds = {
        socks5.Socks5AuthFailed: "auth_failed",
        socks5.Socks5ProxyUnreachable: "proxy_unreachable",
        socks5.Socks5Timeout: "timeout",
        socks5.Socks5ProtocolError: "protocol_error",
    }
    return next((k for cls, k in kinds.items() if isinstance(exc, cls)), "dial_failed")


async def _serve(settings: Settings, device: TunDevice) -> int:
    loop = asyncio.get_running_loop()
    engine = Engine(settings, device, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    observer = None
    dns = None
    paths = PathWatch(engine, loop)  # flows whose path went away are reset, not left hanging
    try:
        paths.start()
        if settings.dns.enabled:  # before the first packet: UDP/53 and TCP/53 are its from then on
            dns = install_dns(engine, settings.dns)
        engine.start()
        observer = await api.start(engine)  # the control API and the packet capture
        log.info(
            "tun2socks running: device %s mtu %d%s, proxy %s",
            device.name,
            device.mtu,
            " with offloads" if device.offload else "",
            settings.proxy.redacted_url,
        )
        await stop.wait()
        log.info("stopping: resetting %d open flows", len(engine.relays))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        paths.stop()
        engine.close()
        for failover in engine.failovers.values():
            await failover.close()
        if dns is not None:
            await dns.close()
        if observer is not None:
            await observer.close()  # after engine.close(): the capture sees the final RSTs
    return 0


def _raise_fd_limit(max_flows: int) -> None:
    """Each flow holds an upstream socket: lift the soft fd limit (often 1024) to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = max_flows + 256  # the TUN, the API, DNS and UDP sockets, some slack
    if hard != resource.RLIM_INFINITY and hard < needed:
        log.warning(
            "open file limit %d is below limits.max_flows + 256 (%d): flows beyond it will fail",
            hard,
            needed,
        )


def run(settings: Settings, *, user: str | None = None) -> int:
    """Run until SIGINT or SIGTERM; the exit status. With `user`, the data path runs as that
    user in a child process (tun2socks.host.privileges)."""
    # Device, routes and resolver are set up before the loop starts and undone after it ended:
    # pyroute2's synchronous API runs a loop of its own.
    _raise_fd_limit(settings.limits.max_flows)
    host = system.Host(settings)
    try:
        device = host.open_device()
        host.setup()
        host.watch()  # network changes: the proxy's host route follows the uplink
    except (DeviceError, system.SetupError) as exc:
        log.error("%s", exc)
        host.close()
        return 1
    except BaseException:
        host.close()
        raise
    # Plain asyncio: with Protocol-based I/O it measured as fast as uvloop or faster here
    # (bench/README.md), so there is no second event loop to depend on.
    failed = True  # route.strict keeps its block after a crash (tun2socks.host.strict)
    try:
        if user is not None:
            keep = bool(settings.route.mark)  # SO_MARK needs CAP_NET_ADMIN
            status = privileges.run_as(
                user, lambda: asyncio.run(_serve(settings, device)), keep_net_admin=keep
            )
        else:
            status = asyncio.run(_serve(settings, device))
        failed = status != 0
        return status
    except KeyboardInterrupt:
        failed = False  # a signal before the loop took over: a deliberate stop
        raise
    finally:
        host.close(failed=failed)
