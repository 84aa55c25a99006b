"""Lightweight asyncio servers for the load tests, run as scripts in the bed's server namespace.

  socks  a SOCKS5 server (RFC 1928, no authentication, CONNECT only) that relays with
         backpressure both ways
  echo   a TCP server that sends back whatever it receives

Why not danted for 10,000 sessions: danted serves each client from a child process that
handles only a few sessions, so 10,000 sessions mean hundreds of processes on a 2-core
machine, and what the test would measure is danted. These servers hold a session in a few KiB
on one event loop. Each process can hold at most RLIMIT_NOFILE fds (20,000 here, and the hard
limit cannot be raised without CAP_SYS_RESOURCE); a SOCKS session takes two, so several
processes share the port with SO_REUSEPORT (`--reuse-port`) and the kernel spreads the load.

Both print one line "listening HOST:PORT" once ready and run until SIGTERM. Independent of
tun2socks's own SOCKS5 code on purpose: a shared bug must not hide itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import resource
import signal
import socket
import struct
import sys

HIGH_WATER = 256 * 1024  # pause reading the other side when a write buffer holds this much


class Pipe(asyncio.Protocol):
    """One side of a relayed session: what it receives goes to `peer`, with backpressure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and peer.can_write_eof():
            peer.write_eof()
        return True  # half-close: the other direction may go on

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()  # a reset stays a reset

    # Writes to this side are blocked: stop reading the side that feeds them until they drain.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class SocksSession(Pipe):
    """The client side: the SOCKS5 handshake, then a Pipe to the destination."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = b""
        self.stage = "greeting"

    def data_received(self, data: bytes) -> None:
        if self.stage == "relay":
            super().data_received(data)
            return
        self.buffer += data
        if self.stage == "greeting" and len(self.buffer) >= 2:
            needed = 2 + self.buffer[1]
            if len(self.buffer) < needed:
                return
            if self.buffer[0] != 5 or 0 not in self.buffer[2:needed]:
                self._fail(b"\x05\xff")
                return
            self.buffer = self.buffer[needed:]
            self.stage = "request"
            assert self.transport is not None
            self.transport.write(b"\x05\x00")
        if self.stage == "request":
            self._maybe_request()

    def _maybe_request(self) -> None:
        buf = self.buffer
        if len(buf) < 5:
            return
        atyp = buf[3]
        if atyp == 1:
            end = 4 + 4
        elif atyp == 4:
            end = 4 + 16
        elif atyp == 3:
            end = 5 + buf[4]
        else:
            self._fail(_reply(8))
            return
        if len(buf) < end + 2:
            return
        if buf[0] != 5 or buf[1] != 1:
            self._fail(_reply(7))
            return
        if atyp == 3:
            host = buf[5:end].decode("ascii", "replace")
        else:
            host = str(ipaddress.ip_address(buf[4:end]))
        (port,) = struct.unpack("!H", buf[end : end + 2])
        rest = buf[end + 2 :]
        self.buffer = b""
        self.stage = "connecting"
        assert self.transport is not None
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._connect(host, port, rest))

    async def _connect(self, host: str, port: int, early: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _transport, upstream = await asyncio.wait_for(
                loop.create_connection(Pipe, host, port), 10.0
            )
        except (OSError, TimeoutError) as exc:
            code = 5 if isinstance(exc, ConnectionRefusedError) else 4
            self._fail(_reply(code))
            return
        if self.transport is None:  # the client went away meanwhile
            upstream.transport and upstream.transport.close()
            return
        self.peer, upstream.peer = upstream, self
        self.stage = "relay"
        self.transport.write(_reply(0))
        if early and upstream.transport is not None:
            upstream.transport.write(early)
        self.transport.resume_reading()

    def _fail(self, answer: bytes) -> None:
        if self.transport is not None:
            self.transport.write(answer)
            self.transport.close()


def _reply(code: int) -> bytes:
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


async def serve(role: str, host: str, port: int, reuse_port: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    factory = SocksSession if role == "socks" else Echo
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = await loop.create_server(
        factory, host, port, family=family, backlog=4096, reuse_port=reuse_port
    )
    print(f"listening {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("socks", "echo"))
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.role, args.host, args.port, args.reuse_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
