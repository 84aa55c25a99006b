"""Test and benchmark clients, run as a script inside the bed's client namespace.

Each subcommand prints one JSON object on stdout and exits 0 (failures are data, not exit codes):

  get-many   N HTTP/1.0 GETs, C at a time (asyncio), each response checked: status 200 and the
             body's sha256; optionally speaking SOCKS5 (no auth) itself, for the ceiling runs.
  half-close connect, send a GET, shutdown(SHUT_WR), then read the whole reply.
  slow-read  GET a large body but read it at a fixed, slow rate for a fixed time, then close.
  hold       open a connection, send an incomplete request (the server waits for the rest),
             print {"connected": true}, then report how the connection ends: reset, eof, timeout.
  hold-many  open N TCP connections that send nothing (C connects in flight at a time), print
             {"opened": K, ...}, hold them until a line (or EOF) on stdin or --hold-timeout, then
             print {"lost": L, ...} (how many the far side closed meanwhile) and close them all.

Every network wait is bounded by a timeout given on the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import resource
import socket
import statistics
import struct
import sys
import time
from dataclasses import dataclass, field


@dataclass
class GetManyResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _split_response(raw: bytes) -> tuple[int, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"no end of headers in {len(raw)} bytes")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2:
        raise ValueError(f"bad status line {head[:40]!r}")
    return int(status_line[1]), body


async def _socks5_connect(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
) -> None:
    """RFC 1928 CONNECT without authentication."""
    writer.write(b"\x05\x01\x00")
    await writer.drain()
    if await reader.readexactly(2) != b"\x05\x00":
        raise ConnectionError("socks5: no-auth method refused")
    ip = ipaddress.ip_address(host)
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    writer.write(b"\x05\x01\x00" + atyp + ip.packed + struct.pack("!H", port))
    await writer.drain()
    reply = await reader.readexactly(4)
    if reply[1] != 0:
        raise ConnectionError(f"socks5: CONNECT failed, reply code {reply[1]}")
    address_length = {1: 4, 4: 16}.get(reply[3])
    if address_length is None:
        address_length = (await reader.readexactly(1))[0]
    await reader.readexactly(address_length + 2)


async def _one_get(args: argparse.Namespace, result: GetManyResult) -> None:
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        if args.socks:
            socks_host, socks_port = args.socks.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(socks_host, int(socks_port))
            await _socks5_connect(reader, writer, args.host, args.port)
        else:
            reader, writer = await asyncio.open_connection(args.host, args.port)
        writer.write(f"GET {args.path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        status, body = _split_response(await reader.read(-1))
        if status != 200:
            raise ValueError(f"HTTP status {status}")
        if args.expect_sha256 and hashlib.sha256(body).hexdigest() != args.expect_sha256:
            raise ValueError(f"body of {len(body)} bytes has the wrong sha256")
        result.latencies_ms.append((time.perf_counter() - started) * 1000.0)
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        result.errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _get_many(args: argparse.Namespace) -> tuple[GetManyResult, float]:
    result = GetManyResult()
    gate = asyncio.Semaphore(args.c)

    async def guarded() -> None:
        async with gate:
            try:
                await asyncio.wait_for(_one_get(args, result), args.req_timeout)
            except TimeoutError:
                result.errors.append(f"timeout after {args.req_timeout} s")

    started = time.perf_counter()
    tasks = [asyncio.create_task(guarded()) for _ in range(args.n)]
    _done, pending = await asyncio.wait(tasks, timeout=args.total_timeout)
    for task in pending:
        task.cancel()
        result.errors.append("total timeout")
    return result, time.perf_counter() - started


def _percentile(values: list[float], percent: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(percent / 100.0 * (len(ordered) - 1)))
    return round(ordered[index], 3)


def cmd_get_many(args: argparse.Namespace) -> dict[str, object]:
    result, wall_s = asyncio.run(_get_many(args))
    lat = result.latencies_ms
    return {
        "n": args.n,
        "c": args.c,
        "ok": len(lat),
        "fail": len(result.errors),
        "wall_s": round(wall_s, 3),
        "rate_per_s": round(len(lat) / wall_s, 1) if wall_s > 0 else None,
        "lat_ms": {
            "p50": _percentile(lat, 50),
            "p90": _percentile(lat, 90),
            "p99": _percentile(lat, 99),
            "max": round(max(lat), 3) if lat else None,
            "mean": round(statistics.fmean(lat), 3) if lat else None,
        },
        "errors": sorted(set(result.errors))[:5],
        # answers slower than --slow-ms (failures are counted in "fail", not here)
        "slow": sum(1 for ms in lat if ms > args.slow_ms),
    }


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def cmd_half_close(args: argparse.Namespace) -> dict[str, object]:
    deadline = time.monotonic() + args.timeout
    with _connect(args.host, args.port, args.timeout) as sock:
        sock.sendall(f"GET /bytes/{args.size} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while time.monotonic() < deadline:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += data
        else:
            return {"error": f"no EOF within {args.timeout} s", "received": len(received)}
    status, body = _split_response(bytes(received))
    return {"status": status, "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def cmd_slow_read(args: argparse.Namespace) -> dict[str, object]:
    """Read at about args.rate bytes/s; the sender must be held back by flow control."""
    with _connect(args.host, args.port, 10.0) as sock:
        sock.sendall(f"GET /bytes/{args.size} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        started = time.monotonic()
        total = 0
        recv_size = 16 * 1024
        while (elapsed := time.monotonic() - started) < args.duration:
            ahead_s = total / args.rate - elapsed
            if ahead_s > 0:
                time.sleep(min(ahead_s, 0.1))
                continue
            data = sock.recv(recv_size)
            if not data:
                break
            total += len(data)
        return {"received": total, "elapsed_s": round(time.monotonic() - started, 3)}


def cmd_hold(args: argparse.Namespace) -> dict[str, object]:
    with _connect(args.host, args.port, 10.0) as sock:
        sock.sendall(b"GET /small HTTP/1.0\r\n")
        print(json.dumps({"connected": True}), flush=True)
        sock.settimeout(args.timeout)
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return {"result": "reset"}
        except TimeoutError:
            return {"result": "timeout"}
        return {"result": "data" if data else "eof"}


class _Held(asyncio.Protocol):
    """An idle connection; notes when the far side ends it."""

    def __init__(self) -> None:
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def _raise_nofile_limit(wanted: int) -> None:
    # each connection is one fd; root may raise the hard limit, others only the soft one
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def _hold_many(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    held: list[tuple[asyncio.BaseTransport, _Held]] = []
    errors: list[str] = []
    gate = asyncio.Semaphore(args.c)

    async def open_one() -> None:
        async with gate:
            try:
                transport, protocol = await asyncio.wait_for(
                    loop.create_connection(_Held, args.host, args.port), args.connect_timeout
                )
                held.append((transport, protocol))
            except (OSError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")

    started = time.perf_counter()
    tasks = [asyncio.create_task(open_one()) for _ in range(args.n)]
    _done, pending = await asyncio.wait(tasks, timeout=args.total_timeout)
    for task in pending:
        task.cancel()
        errors.append("total timeout")
    connect_s = time.perf_counter() - started
    print(
        json.dumps(
            {
                "opened": len(held),
                "failed": len(errors),
                "connect_s": round(connect_s, 3),
                "errors": sorted(set(errors))[:5],
            }
        ),
        flush=True,
    )
    # hold until told: stdin readable means a line or EOF (the driver closed its pipe)
    told = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), told.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(told.wait(), args.hold_timeout)
    loop.remove_reader(sys.stdin.fileno())
    lost = sum(1 for _, protocol in held if protocol.lost)
    for transport, _ in held:
        transport.close()
    await asyncio.sleep(0)  # let the transports run their close callbacks
    return {"opened": len(held), "lost": lost}


def cmd_hold_many(args: argparse.Namespace) -> dict[str, object]:
    _raise_nofile_limit(args.n + 256)
    return asyncio.run(_hold_many(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="clients for the tun2socks integration bed")
    sub = parser.add_subparsers(dest="command", required=True)

    many = sub.add_parser("get-many")
    many.add_argument("--host", required=True)
    many.add_argument("--port", type=int, default=8080)
    many.add_argument("--path", default="/small")
    many.add_argument("-n", type=int, default=200)
    many.add_argument("-c", type=int, default=200)
    many.add_argument("--socks", default="", help="HOST:PORT of a no-auth SOCKS5 server")
    many.add_argument("--expect-sha256", default="")
    many.add_argument("--req-timeout", type=float, default=20.0)
    many.add_argument("--total-timeout", type=float, default=60.0)
    many.add_argument("--slow-ms", type=float, default=5000.0, help="threshold of 'slow'")
    many.set_defaults(handler=cmd_get_many)

    half = sub.add_parser("half-close")
    half.add_argument("--host", required=True)
    half.add_argument("--port", type=int, default=8080)
    half.add_argument("--size", type=int, required=True)
    half.add_argument("--timeout", type=float, default=30.0)
    half.set_defaults(handler=cmd_half_close)

    slow = sub.add_parser("slow-read")
    slow.add_argument("--host", required=True)
    slow.add_argument("--port", type=int, default=8080)
    slow.add_argument("--size", type=int, required=True)
    slow.add_argument("--rate", type=float, default=1024 * 1024, help="bytes per second")
    slow.add_argument("--duration", type=float, default=8.0)
    slow.set_defaults(handler=cmd_slow_read)

    hold = sub.add_parser("hold")
    hold.add_argument("--host", required=True)
    hold.add_argument("--port", type=int, default=8080)
    hold.add_argument("--timeout", type=float, default=20.0)
    hold.set_defaults(handler=cmd_hold)

    hold_many = sub.add_parser("hold-many")
    hold_many.add_argument("--host", required=True)
    hold_many.add_argument("--port", type=int, required=True)
    hold_many.add_argument("-n", type=int, default=1000)
    hold_many.add_argument("-c", type=int, default=200, help="connects in flight at a time")
    hold_many.add_argument("--connect-timeout", type=float, default=15.0)
    hold_many.add_argument("--total-timeout", type=float, default=120.0, help="connect phase")
    hold_many.add_argument("--hold-timeout", type=float, default=120.0)
    hold_many.set_defaults(handler=cmd_hold_many)

    args = parser.parse_args(argv)
    try:
        out = args.handler(args)
    except (OSError, ValueError) as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
