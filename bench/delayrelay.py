"""A TCP relay that holds every chunk for a fixed time each way: the "proxy 20 ms away" rows.

Run as a script inside the bed's server namespace, in front of danted: clients (tun2socks, or
curl speaking SOCKS5 for the ceiling) connect to `--listen`, the relay connects to `--to`, and
whatever one side sends reaches the other `--delay-ms` later (10 ms each way: a 20 ms round
trip). This kernel has no `netem`, so the delay is made here, in user space.

What it does not delay: the TCP handshake with the relay itself (the relay's kernel answers the
SYN at once), so a client pays the delay on the SOCKS5 exchanges and the data, not on its TCP
connect. A real proxy 20 ms away costs one round trip more to every client that opens a new
connection to it.

Bounded: at most `--max-conns` connections (more are closed at once), and at most
`QUEUE_LIMIT` bytes held per direction (reading from the sender pauses until they drain). Order
is kept: each direction is one queue, released by one timer armed for its head. Runs until
SIGTERM (the bench stops it; deleting the namespace kills it in any case).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import socket
import sys

QUEUE_LIMIT = 1 << 20  # bytes held in one direction before the sender is paused
CONNECT_TIMEOUT_S = 10.0


class _Direction:
    """Chunks from `source` waiting for their time to go to `sink` (None in the queue: EOF)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay_s: float, conn: _Connection) -> None:
        self.loop = loop
        self.delay_s = delay_s
        self.conn = conn
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.held = 0
        self.timer: asyncio.TimerHandle | None = None
        self.source: asyncio.Transport | None = None
        self.sink: asyncio.Transport | None = None  # None until the upstream is connected
        self.source_paused = False
        self.sink_full = False  # the sink's transport asked us to stop writing
        self.close_when_empty = False  # the source has gone: close the pair after the queue

    def push(self, data: bytes | None) -> None:
        self.queue.append((self.loop.time() + self.delay_s, data))
        self.held += len(data or b"")
        if self.held > QUEUE_LIMIT:
            self._pause_source()
        if self.timer is None:
            self._arm()

    def _arm(self) -> None:
        if self.queue and self.sink is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self.release)

    def release(self) -> None:
        """Send every chunk whose time has come, in order; re-arm for the next one."""
        self.timer = None
        sink = self.sink
        if sink is None or sink.is_closing():
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data is None:
                if sink.can_write_eof():
                    sink.write_eof()
                self.conn.eof_sent()
                continue
            self.held -= len(data)
            sink.write(data)
        if not self.queue and self.close_when_empty:
            self.conn.close()
            return
        if self.held <= QUEUE_LIMIT // 2 and not self.sink_full:
            self._resume_source()
        self._arm()

    def sink_ready(self, sink: asyncio.Transport) -> None:
        self.sink = sink
        if self.timer is None:
            self._arm()

    def _pause_source(self) -> None:
        if self.source is not None and not self.source_paused:
            self.source.pause_reading()
            self.source_paused = True

    def _resume_source(self) -> None:
        if self.source is not None and self.source_paused and not self.source.is_closing():
            self.source.resume_reading()
            self.source_paused = False

    def set_sink_full(self, full: bool) -> None:
        self.sink_full = full
        if full:
            self._pause_source()
        elif self.held <= QUEUE_LIMIT // 2:
            self._resume_source()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class _Side(asyncio.Protocol):
    """One TCP connection of the pair: what it reads goes into `outgoing`."""

    def __init__(self, conn: _Connection, outgoing: _Direction, incoming: _Direction) -> None:
        self.conn = conn
        self.outgoing = outgoing
        self.incoming = incoming

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn.transports.append(transport)
        if self.conn.closed:
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.outgoing.source = transport
        self.incoming.sink_ready(transport)

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.outgoing.push(None)
        return True  # keep our sending half open until the other side's EOF has gone out

    def pause_writing(self) -> None:
        self.incoming.set_sink_full(True)

    def resume_writing(self) -> None:
        self.incoming.set_sink_full(False)

    def connection_lost(self, exc: Exception | None) -> None:
        # a clean close still delivers what this side sent before it (the last of a response)
        if exc is not None or not self.outgoing.queue:
            self.conn.close()
        else:
            self.outgoing.close_when_empty = True


class _Connection:
    """A client connection and its upstream connection, with one delayed queue each way."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        loop = asyncio.get_running_loop()
        self.up = _Direction(loop, relay.delay_s, self)  # client -> upstream
        self.down = _Direction(loop, relay.delay_s, self)  # upstream -> client
        self.transports: list[asyncio.BaseTransport] = []
        self.eofs = 0
        self.closed = False

    def client_side(self) -> _Side:
        return _Side(self, self.up, self.down)

    def upstream_side(self) -> _Side:
        return _Side(self, self.down, self.up)

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(self.upstream_side, self.relay.to_host, self.relay.to_port),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError):
            self.close()

    def eof_sent(self) -> None:
        self.eofs += 1
        if self.eofs == 2:  # both halves done
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.cancel()
        self.down.cancel()
        for transport in self.transports:
            transport.close()
        self.relay.connections.discard(self)


class Relay:
    def __init__(self, to_host: str, to_port: int, delay_s: float, max_conns: int) -> None:
        self.to_host = to_host
        self.to_port = to_port
        self.delay_s = delay_s
        self.max_conns = max_conns
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def accept(self) -> asyncio.Protocol:
        conn = _Connection(self)
        side = conn.client_side()
        if len(self.connections) >= self.max_conns:
            conn.closed = True  # connection_made below closes the client at once
        else:
            self.connections.add(conn)
            task = asyncio.get_running_loop().create_task(conn.dial())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return side


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    to_host, to_port = args.to.rsplit(":", 1)
    relay = Relay(to_host, int(to_port), args.delay_ms / 1000.0, args.max_conns)
    host, port = args.listen.rsplit(":", 1)
    server = await loop.create_server(relay.accept, host, int(port), backlog=1024)
    print(f"relaying {args.listen} -> {args.to}, {args.delay_ms} ms each way", flush=True)
    async with server:
        await stop.wait()
    for conn in list(relay.connections):
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TCP relay that delays every chunk each way")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--to", required=True, help="HOST:PORT of the proxy behind")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="per direction")
    parser.add_argument("--max-conns", type=int, default=4096)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
