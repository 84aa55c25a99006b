"""A scenario interpreter for fuzzing the sans-IO stack: operations in, invariants checked.

Both fuzzers drive the same code: hypothesis (`test_fuzz_tcp.py`) draws a list of `Op`s from
strategies, atheris (`tests/fuzz/fuzz_tcp_stack.py`) decodes them from its byte string. Each
operation is something a client kernel (well-behaved or hostile), the layer above (accept,
send, receive, shutdown, abort) or the clock can do. After every operation `Scenario.step`
flushes the stack, parses everything it sent and checks:

- no exception escapes the stack (any exception fails the fuzzer);
- every packet parses with valid checksums and is addressed to a known client;
- sequence arithmetic stays in window: data we send ends within the right edge the client
  advertised, and we never acknowledge sequence space the client has not sent;
- buffers stay within their caps: received-but-unread data and out-of-order data within the
  receive buffer, the send buffer within its cap plus the one chunk that filled it;
- the caps on flows and half-open flows hold, and the timer heap stays bounded;
- a timer never fires twice at the same instant (that would be a busy loop in the app).

`Scenario.finish` then lets every timer run out: each flow must be gone and the stack's tables
empty (no leak). Invariant checks read a few internal counters; they never set one.
"""

from __future__ import annotations

import dataclasses
import random
from typing import NamedTuple

from tun2socks.net.events import FlowRequested
from tun2socks.net.ip import IpPacket
from tun2socks.net.stack import Stack, StackConfig
from tun2socks.net.tcp import ACK, FIN, RST, SYN, TcpOptions, TcpSegment
from tun2socks.net.tcp_conn import TcpState, seq_diff

SEQ_MASK = 0xFFFF_FFFF
CLIENT = bytes((198, 18, 0, 2))
SERVER = bytes((192, 0, 2, 80))
SERVER_PORT = 80
BASE_PORT = 40000
N_CLIENTS = 6  # more clients than max_flows, so that the caps are exercised

CONFIG = StackConfig(
    mtu=576,
    recv_buffer=4096,
    send_buffer=4096,
    max_flows=4,
    max_half_open=2,
    idle_timeout=30.0,
    time_wait=2.0,
)
APP_CHUNK = 1500  # the most the layer above hands to `send` at once

# Operation codes.
SYN_OP, ACCEPT, REJECT, DATA, ACK_OP, FIN_OP, RST_OP, RAW = range(8)
APP_SEND, APP_RECEIVE, APP_SHUTDOWN, APP_ABORT, WAIT, WINDOW = range(8, 14)
CONNECT = 14  # SYN, and the layer above accepts it at once: the common case
N_OPS = 15


class Op(NamedTuple):
    """One step. `client` picks a client; `a` and `b` are op-specific numbers; `data` a payload."""

    code: int
    client: int = 0
    a: int = 0
    b: int = 0
    data: bytes = b""


class InvariantError(AssertionError):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantError(message)


@dataclasses.dataclass
class ClientModel:
    """What the client kernel of one 4-tuple knows: its own sequence state and our window."""

    port: int
    iss: int = 0
    snd_nxt: int = 0  # wire numbers
    rcv_nxt: int | None = None  # None until our SYN-ACK arrived
    window: int = 65535
    wscale: int | None = None
    max_sent: int = 0  # highest sequence offset the client has sent (relative to iss + 1)
    right_edge: int | None = None  # highest right edge it advertised (offset in our space)
    server_iss: int | None = None


class Scenario:
    def __init__(self, seed: int = 0) -> None:
        self.stack = Stack(CONFIG, random.Random(seed))
        self.now = 0.0
        self.clients = [ClientModel(BASE_PORT + i) for i in range(N_CLIENTS)]
        self.pending: list[int] = []  # FlowRequested not yet accepted or rejected
        self.flow_of: dict[int, int] = {}  # port -> flow id
        self.queued: dict[int, int] = {}  # flow id -> size of the last chunk given to send
        self.shut: set[int] = set()
        self.last_timer_fire: tuple[float, int] | None = None

    # ------------------------------------------------------------ driving

    def run(self, ops: list[Op]) -> None:
        for op in ops:
            self.step(op)
        self.finish()

    def step(self, op: Op) -> None:
        client = self.clients[op.client % N_CLIENTS]
        code = op.code % N_OPS
        if code in (SYN_OP, CONNECT):
            self._syn(client, op)
            if code == CONNECT:
                self._flush()
                flow_id = self.flow_of.get(client.port)
                if flow_id in self.pending:
                    self.pending.remove(flow_id)
                    self.stack.accept(flow_id, self.now)
        elif code in (ACCEPT, REJECT):
            self._decide(op, accept=code == ACCEPT)
        elif code == DATA:
            self._send(client, ACK, op.data)
        elif code == ACK_OP:
            self._send(client, ACK, b"")
        elif code == FIN_OP:
            self._send(client, FIN | ACK, op.data[:64])
        elif code == RST_OP:
            self._rst(client, op)
        elif code == RAW:
            self._raw(client, op)
        elif code == WINDOW:
            client.window = op.a & 0xFFFF if op.b & 1 else 0
            self._send(client, ACK, b"")
        else:
            self._app(client, code, op)
        self._flush()
        self._check_stack()

    def finish(self) -> None:
        """Run every timer out: all flows must end and leave nothing behind."""
        for flow_id in list(self.pending):
            self.stack.reject(flow_id)
        self.pending.clear()
        for _ in range(10_000):
            deadline = self.stack.get_timer()
            if deadline is None:
                break
            self._fire(max(self.now, deadline))
            self._flush()
        else:
            raise InvariantError("timers did not run out")
        _check(self.stack.flow_count == 0, f"{self.stack.flow_count} flows left after timers")
        tables = (self.stack._flows, self.stack._half_open, self.stack._scheduled)
        _check(not any(tables), "stack tables not empty after all flows ended")

    # ------------------------------------------------------------ the client side

    def _syn(self, client: ClientModel, op: Op) -> None:
        flow_id = self.flow_of.get(client.port)
        conn = self.stack.connection(flow_id) if flow_id is not None else None
        reopens = (
            conn is not None
            and conn.state is TcpState.TIME_WAIT
            and conn.may_reopen(op.a & SEQ_MASK)
        )
        if conn is not None and not reopens:
            # A SYN inside a live connection, or an old one in TIME-WAIT (not above RCV.NXT,
            # RFC 6191): hostile, the client's state does not change.
            segment = TcpSegment(client.port, SERVER_PORT, op.a & SEQ_MASK, 0, SYN, op.b & 0xFFFF)
            self._note_sent(client, segment)
            self._deliver(segment)
            return
        client.iss = op.a & SEQ_MASK
        client.snd_nxt = (client.iss + 1) & SEQ_MASK
        client.rcv_nxt = None
        client.server_iss = None
        client.max_sent = 0
        client.window = op.b & 0xFFFF
        client.wscale = (op.b >> 16) % 15 if op.b & 0x1_0000_0000 else None  # RFC 7323: <= 14
        mss = (op.b >> 20) & 0xFFFF if op.b & 0x2_0000_0000 else None
        client.right_edge = client.window - 1  # our SYN is offset -1; never scaled in a SYN
        segment = TcpSegment(
            client.port,
            SERVER_PORT,
            client.iss,
            0,
            SYN,
            client.window,
            options=TcpOptions(mss=mss, wscale=client.wscale),
        )
        self._deliver(segment)

    def _send(self, client: ClientModel, flags: int, payload: bytes) -> None:
        ack = client.rcv_nxt if client.rcv_nxt is not None else 0
        segment = TcpSegment(
            client.port, SERVER_PORT, client.snd_nxt, ack, flags, self._window_field(client)
        )
        segment.payload = payload
        self._note_sent(client, segment)
        self._deliver(segment)
        client.snd_nxt = (client.snd_nxt + segment.seq_len) & SEQ_MASK

    def _rst(self, client: ClientModel, op: Op) -> None:
        seq = client.snd_nxt if op.a & 1 else (client.snd_nxt + op.b) & SEQ_MASK
        self._deliver(TcpSegment(client.port, SERVER_PORT, seq, 0, RST, 0))

    def _raw(self, client: ClientModel, op: Op) -> None:
        """A hostile segment: any flags, sequence and acknowledgment near the real ones."""
        seq = (client.snd_nxt + _signed(op.a, 70_000)) & SEQ_MASK
        ack = ((client.rcv_nxt or 0) + _signed(op.b, 70_000)) & SEQ_MASK
        flags = (op.a >> 20) & 0xFF
        window = (op.b >> 20) & 0xFFFF
        segment = TcpSegment(client.port, SERVER_PORT, seq, ack, flags, window, op.data)
        self._note_sent(client, segment)
        self._deliver(segment)

    def _window_field(self, client: ClientModel) -> int:
        return min(client.window, 0xFFFF)

    def _note_sent(self, client: ClientModel, segment: TcpSegment) -> None:
        """Record what this segment lets the stack believe: sequence space sent, window edge."""
        sent = seq_diff((segment.seq + segment.seq_len) & SEQ_MASK, (client.iss + 1) & SEQ_MASK)
        client.max_sent = max(client.max_sent, sent)
        if segment.flags & ACK and client.server_iss is not None:
            scale = client.wscale if client.wscale is not None else 0
            ack_off = seq_diff(segment.ack, (client.server_iss + 1) & SEQ_MASK)
            edge = ack_off + (segment.window << scale)
            if client.right_edge is None or edge > client.right_edge:
                client.right_edge = edge

    def _deliver(self, segment: TcpSegment) -> None:
        self.stack.receive_packet(segment.build(4, CLIENT, SERVER), self.now)

    # ------------------------------------------------------------ the layer above

    def _decide(self, op: Op, *, accept: bool) -> None:
        if not self.pending:
            return
        flow_id = self.pending.pop(op.a % len(self.pending))
        if accept:
            self.stack.accept(flow_id, self.now)
        else:
            self.stack.reject(flow_id)

    def _app(self, client: ClientModel, code: int, op: Op) -> None:
        flow_id = self.flow_of.get(client.port)
        if code == WAIT:
            self._fire(self.now + (op.a % 5000) / 1000)  # up to 5 s
            return
        if flow_id is None or self.stack.connection(flow_id) is None:
            return
        if code == APP_SEND and flow_id not in self.shut:
            conn = self.stack.connection(flow_id)
            # Like the relay: stop at a full buffer, until SendSpaceAvailable.
            if conn is not None and conn.send_space > 0:
                chunk = op.data * (1 + op.b % 8)
                chunk = chunk[:APP_CHUNK] or b"x"
                self.queued[flow_id] = len(chunk)
                self.stack.send(flow_id, chunk)
        elif code == APP_RECEIVE:
            self.stack.receive(flow_id)
        elif code == APP_SHUTDOWN:
            self.stack.shutdown(flow_id)
            self.shut.add(flow_id)
        elif code == APP_ABORT:
            self.stack.abort(flow_id)

    def _fire(self, now: float) -> None:
        self.now = now
        deadline = self.stack.get_timer()
        if deadline is None or deadline > now:
            return
        self.stack.handle_timer(now)
        after = self.stack.get_timer()
        _check(after is None or after > now, f"timer at {after} still due after firing at {now}")

    # ------------------------------------------------------------ output and checks

    def _flush(self) -> None:
        # Like a kernel, a client answers a SYN-ACK and new data at once with an ACK; that may
        # make the stack send more, so repeat (bounded) until it is quiet.
        for _ in range(100):
            packets = self.stack.packets_to_send(self.now)
            if not packets:
                break
            to_ack: dict[int, ClientModel] = {}
            for data in packets:
                client = self._check_packet(data)
                if client is not None:
                    to_ack[client.port] = client
            for client in to_ack.values():
                self._send(client, ACK, b"")
        while (event := self.stack.next_event()) is not None:
            if isinstance(event, FlowRequested):
                self.pending.append(event.flow_id)
                self.flow_of[event.src_port] = event.flow_id
        # A flow that ended may have been requested and never decided: forget it.
        self.pending = [f for f in self.pending if self.stack.connection(f) is not None]

    def _check_packet(self, data: bytes) -> ClientModel | None:
        """Check one packet we sent; the client if it took something it must acknowledge."""
        packet = IpPacket.parse(data)  # raises on a bad IP checksum or length
        segment = TcpSegment.parse(packet)  # ... or a bad TCP checksum
        _check((packet.src, packet.dst) == (SERVER, CLIENT), "packet to an unknown address")
        index = segment.dst_port - BASE_PORT
        _check(0 <= index < N_CLIENTS, f"packet to unknown port {segment.dst_port}")
        client = self.clients[index]
        if segment.flags & RST:
            return None
        if segment.flags & SYN:
            _check(segment.flags & ACK != 0, "a SYN without ACK from the server side")
            client.server_iss = segment.seq
            client.rcv_nxt = (segment.seq + 1) & SEQ_MASK
        if segment.flags & ACK:
            acked = seq_diff(segment.ack, (client.iss + 1) & SEQ_MASK)
            _check(acked <= client.max_sent, f"ACK {acked} beyond what was sent {client.max_sent}")
        if client.server_iss is not None and segment.payload:
            end = seq_diff(
                (segment.seq + len(segment.payload)) & SEQ_MASK,
                (client.server_iss + 1) & SEQ_MASK,
            )
            edge = client.right_edge
            _check(edge is not None and end <= edge, f"data up to {end} beyond window {edge}")
        # The client takes in-order data and FIN (its application reads at once).
        if segment.flags & SYN:
            return client
        in_order = client.rcv_nxt is not None and segment.seq == client.rcv_nxt
        if in_order and client.window and segment.seq_len:
            client.rcv_nxt = (segment.seq + segment.seq_len) & SEQ_MASK
            return client
        return None

    def _check_stack(self) -> None:
        stack = self.stack
        config = stack.config
        _check(stack.flow_count <= config.max_flows, "more flows than max_flows")
        _check(stack.half_open_count <= config.max_half_open, "more half-open than the cap")
        live = len(stack._scheduled)
        _check(len(stack._timers) <= 4 * live + 1025, "timer heap grows without bound")
        for conn in stack.connections():
            _check(conn.state is not TcpState.CLOSED, "a CLOSED flow is still in the table")
            _check(conn.snd_una <= conn.snd_nxt <= conn.snd_max, "send sequence out of order")
            data_end = conn._buf_start + len(conn._snd_buf)
            _check(conn.snd_max <= data_end + 1, "sent beyond the data and FIN")
            _check(conn.receive_window <= config.recv_buffer, "window above the buffer")
            _check(conn._rcv_buffered <= config.recv_buffer, "receive buffer over its cap")
            _check(conn._ooo_bytes <= config.recv_buffer, "out-of-order data over the window")
            for offset, chunk in conn._ooo.items():
                _check(offset > conn.rcv_nxt - len(chunk), "stale out-of-order data kept")
            cap = config.send_buffer + self.queued.get(conn.flow_id, 0)
            _check(len(conn._snd_buf) <= cap, "send buffer over its cap")


def _signed(value: int, span: int) -> int:
    return value % (2 * span + 1) - span


# ---------------------------------------------------------------- decoding bytes (atheris)


def ops_from_bytes(data: bytes, max_ops: int = 64) -> list[Op]:
    """Decode a fuzzer's byte string into operations: 12 bytes each, then a short payload."""
    ops: list[Op] = []
    i = 0
    while i + 12 <= len(data) and len(ops) < max_ops:
        code, client, size = data[i], data[i + 1], data[i + 2] % 128
        a = int.from_bytes(data[i + 3 : i + 7], "big")
        b = int.from_bytes(data[i + 7 : i + 12], "big")
        payload = data[i + 12 : i + 12 + size]
        ops.append(Op(code, client, a, b, payload))
        i += 12 + size
    return ops
