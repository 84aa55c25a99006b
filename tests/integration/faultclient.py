"""Clients for the fault tests (run as a script in the client namespace); JSON lines on stdout.

transfers  --downloads D endless downloads and --uploads U endless uploads to the bed's HTTP
           server. Prints {"event": "flowing"} once each has moved --warm bytes, keeps going,
           and reports how and when (time.monotonic(), the same clock in every process) each
           one ended: "eof", "reset", "broken_pipe", "error ..." or "still_running" if it had
           not ended --linger seconds after a line on stdin (or after --max-time).
stall      GET --size bytes with a small receive buffer, read --before bytes, then stop
           reading for --stall seconds (the window closes), then read the rest. Prints
           {"event": "stalled"} when it stops reading, {"event": "resumed"} and finally
           {"received": N, "sha256": HEX, "seconds": S}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import socket
import sys
import time
from collections.abc import Callable

CHUNK = 64 * 1024


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def kind_of(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, BrokenPipeError):
        return "broken_pipe"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "eof"
    return f"error {type(exc).__name__}"


class Transfer:
    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.moved = 0
        self.kind: str | None = None
        self.ended: float | None = None

    def end(self, kind: str) -> None:
        if self.kind is None:
            self.kind, self.ended = kind, time.monotonic()


async def download(host: str, port: int, t: Transfer) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /bytes/{1 << 40} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                t.end("eof")
                return
            t.moved += len(data)
    except OSError as exc:
        t.end(kind_of(exc))
    finally:
        writer.transport.abort()


async def upload(host: str, port: int, t: Transfer) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {1 << 40}\r\n\r\n".encode()
    )
    block = bytes(CHUNK)

    async def watch_reads() -> None:
        # An upload's server says nothing until the end. An EOF alone (the upstream's FIN,
        # relayed) ends nothing: the client keeps sending, as HTTP clients do, and must then
        # be reset; any data or error is the end.
        try:
            data = await reader.read(CHUNK)
            if data:
                t.end("unexpected data")
        except OSError as exc:
            t.end(kind_of(exc))

    watcher = asyncio.ensure_future(watch_reads())
    try:
        while t.kind is None:
            writer.write(block)
            await writer.drain()
            t.moved += len(block)
    except OSError as exc:
        t.end(kind_of(exc))
    finally:
        watcher.cancel()
        writer.transport.abort()


async def cmd_transfers(args: argparse.Namespace) -> None:
    transfers = [Transfer("down") for _ in range(args.downloads)]
    transfers += [Transfer("up") for _ in range(args.uploads)]
    tasks = [
        asyncio.ensure_future(
            (download if t.direction == "down" else upload)(args.host, args.port, t)
        )
        for t in transfers
    ]
    deadline = time.monotonic() + args.max_time
    while any(t.moved < args.warm and t.kind is None for t in transfers):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    emit(event="flowing", moved=[t.moved for t in transfers])
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            loop.run_in_executor(None, sys.stdin.readline), deadline - time.monotonic()
        )
    await asyncio.wait(tasks, timeout=args.linger)
    for task in tasks:
        task.cancel()
    emit(
        event="result",
        ends=[
            {"dir": t.direction, "kind": t.kind or "still_running", "at": t.ended, "moved": t.moved}
            for t in transfers
        ],
    )


def read_into(
    sock: socket.socket, update: Callable[[bytes], object], received: int, *, until: int
) -> int:
    """Read, handing each chunk to `update`, until `until` bytes in all (or EOF); the bytes
    received in all."""
    while received < until:
        data = sock.recv(CHUNK)
        if not data:
            break
        update(data)
        received += len(data)
    return received


def cmd_stall(args: argparse.Namespace) -> None:
    started = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    sock.settimeout(args.timeout)
    sock.connect((args.host, args.port))
    sock.sendall(f"GET /bytes/{args.size} HTTP/1.1\r\nHost: {args.host}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    _, _, body = head.partition(b"\r\n\r\n")
    digest = hashlib.sha256(body)
    received = len(body)
    received = read_into(sock, digest.update, received, until=args.before)
    emit(event="stalled", received=received)
    time.sleep(args.stall)
    emit(event="resumed")
    received = read_into(sock, digest.update, received, until=args.size)
    sock.close()
    emit(received=received, sha256=digest.hexdigest(), seconds=round(time.monotonic() - started, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    transfers = sub.add_parser("transfers")
    transfers.add_argument("--host", required=True)
    transfers.add_argument("--port", type=int, default=8080)
    transfers.add_argument("--downloads", type=int, default=4)
    transfers.add_argument("--uploads", type=int, default=4)
    transfers.add_argument("--warm", type=int, default=1 << 20)
    transfers.add_argument("--linger", type=float, default=10.0)
    transfers.add_argument("--max-time", type=float, default=60.0)
    stall = sub.add_parser("stall")
    stall.add_argument("--host", required=True)
    stall.add_argument("--port", type=int, default=8080)
    stall.add_argument("--size", type=int, required=True)
    stall.add_argument("--before", type=int, default=1 << 20)
    stall.add_argument("--stall", type=float, default=60.0)
    stall.add_argument("--rcvbuf", type=int, default=64 * 1024)
    stall.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args()
    if args.command == "transfers":
        asyncio.run(cmd_transfers(args))
    else:
        cmd_stall(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
