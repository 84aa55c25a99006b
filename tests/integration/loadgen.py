"""Client-side traffic for the load and soak tests (run as a script in the client namespace).

  load   open N TCP connections to an echo server; then one half moves data (each sends
         --bytes and reads them back), the other half stays idle; then every idle one proves
         it is alive (one byte there and back); then all close. Steps are driven by lines on
         stdin ("data", "idle", "close") so that the test can measure in between; each step
         prints one JSON line ({"event": ...}).
  burst  start N connections at the same moment, no pacing: each connects, echoes --bytes
         and closes; prints {"ok": K, "of": N, "errors": {...}, ...}.
  probe  connect, echo a few bytes, close, every --interval seconds for --duration seconds;
         prints {"ok": K, "failed": F, "errors": [...]} (real connections during a flood).
  soak   rounds of mixed traffic for --duration seconds with a fixed set of idle connections
         held throughout, and optionally UDP echo sessions and DNS queries (soakudp.py);
         after each round a JSON line {"event": "round", ...} and a pause (--pause) with no
         traffic, in which the test samples tun2socks; then a summary.

Every wait is bounded; failures are counted and reported as data, never raised.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

from tests.integration import soakudp

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def raise_nofile_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pattern(size: int, seed: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    return (block * (size // len(block) + 1))[:size]


def describe(exc: BaseException) -> str:
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


async def open_conn(host: str, port: int, timeout: float) -> Conn:
    return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)


async def echo_once(conn: Conn, payload: bytes, timeout: float) -> None:
    reader, writer = conn
    writer.write(payload)
    got = await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
    if got != payload:
        raise ValueError("echo mismatch")


async def close_conn(conn: Conn) -> None:
    writer = conn[1]
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def read_command(expected: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), timeout)
    if line.strip() != expected:
        raise SystemExit(f"expected {expected!r} on stdin, got {line!r}")


async def gather_counted(coros: list[Awaitable[None]], timeout: float) -> tuple[int, Counter[str]]:
    """Run all; (successes, Counter of error descriptions); the rest count as timeouts."""
    errors: Counter[str] = Counter()

    async def one(coro: Awaitable[None]) -> bool:
        try:
            await coro
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
            errors[describe(exc)[:80]] += 1
            return False
        return True

    tasks = [asyncio.ensure_future(one(c)) for c in coros]
    done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    if pending:
        errors["step timeout"] += len(pending)
    ok = sum(1 for task in done if task.result())
    return ok, errors


# ---------------------------------------------------------------- load


async def cmd_load(args: argparse.Namespace) -> None:
    raise_nofile_limit()
    gate = asyncio.Semaphore(args.c)
    conns: list[Conn | None] = [None] * args.n

    async def open_one(i: int) -> None:
        async with gate:
            conns[i] = await open_conn(args.host, args.port, args.connect_timeout)

    started = time.monotonic()
    opened, errors = await gather_counted([open_one(i) for i in range(args.n)], args.step_timeout)
    emit(event="open", opened=opened, seconds=round(time.monotonic() - started, 1),
         errors=dict(errors.most_common(5)))  # fmt: skip
    live = [c for c in conns if c is not None]
    n_data = int(len(live) * (1 - args.idle_fraction))
    data, idle = live[:n_data], live[n_data:]

    await read_command("data", args.step_timeout)
    started = time.monotonic()
    # At most --data-c exchanges in flight: every connection stays open, but thousands of
    # simultaneous bursts would overflow the TUN's kernel queue (500 packets) and leave the
    # clients' retransmission timers to recover, which takes tens of seconds.
    data_gate = asyncio.Semaphore(args.data_c)

    async def move(conn: Conn, seed: int) -> None:
        async with data_gate:
            await echo_once(conn, pattern(args.bytes, seed), args.step_timeout)

    moved, errors = await gather_counted(
        [move(c, i) for i, c in enumerate(data)], args.step_timeout
    )
    emit(event="data", ok=moved, of=len(data), seconds=round(time.monotonic() - started, 1),
         errors=dict(errors.most_common(5)))  # fmt: skip

    await read_command("idle", args.step_timeout)
    alive, errors = await gather_counted(
        [echo_once(c, b"?", args.step_timeout) for c in idle], args.step_timeout
    )
    emit(event="idle", ok=alive, of=len(idle), errors=dict(errors.most_common(5)))

    await read_command("close", args.step_timeout)
    await gather_counted([close_conn(c) for c in live], args.step_timeout)
    emit(event="closed", closed=len(live))


# ---------------------------------------------------------------- burst


async def cmd_burst(args: argparse.Namespace) -> None:
    """-n connections started at the same moment, no pacing: each connects, echoes, closes."""
    raise_nofile_limit()
    latencies: list[float] = []

    async def one(seed: int) -> None:
        started = time.monotonic()
        conn = await open_conn(args.host, args.port, args.timeout)
        try:
            await echo_once(conn, pattern(args.bytes, seed), args.timeout)
        finally:
            await close_conn(conn)
        latencies.append(time.monotonic() - started)

    started = time.monotonic()
    ok, errors = await gather_counted([one(i) for i in range(args.n)], args.step_timeout)
    latencies.sort()
    emit(ok=ok, of=args.n, seconds=round(time.monotonic() - started, 1),
         errors=dict(errors.most_common(5)),
         p50=round(latencies[len(latencies) // 2], 3) if latencies else None,
         max_latency=round(latencies[-1], 3) if latencies else None)  # fmt: skip


# ---------------------------------------------------------------- probe


async def cmd_probe(args: argparse.Namespace) -> None:
    ok = failed = 0
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            conn = await open_conn(args.host, args.port, args.timeout)
            try:
                await echo_once(conn, b"probe", args.timeout)
            finally:
                await close_conn(conn)
            ok += 1
            latencies.append(time.monotonic() - started)
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
            failed += 1
            errors[describe(exc)[:80]] += 1
        await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    emit(ok=ok, failed=failed, errors=dict(errors.most_common(5)),
         max_latency=round(max(latencies), 3) if latencies else None)  # fmt: skip


# ---------------------------------------------------------------- soak


async def http_get(host: str, port: int, path: str, timeout: float) -> bytes:
    reader, writer = await open_conn(host, port, timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        await close_conn((reader, writer))
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(f"HTTP answer {head[:30]!r}")
    return body


async def http_upload(host: str, port: int, size: int, timeout: float) -> None:
    reader, writer = await open_conn(host, port, timeout)
    try:
        body = pattern(size, size)
        writer.write(
            f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        writer.write(body)
        response = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        await close_conn((reader, writer))
    if hashlib.sha256(body).hexdigest().encode() not in response:
        raise ValueError("upload digest mismatch")


async def refused(host: str, port: int, timeout: float) -> None:
    try:
        conn = await open_conn(host, port, timeout)
    except ConnectionRefusedError:
        return
    await close_conn(conn)
    raise ValueError("a closed port accepted")


async def cmd_soak(args: argparse.Namespace) -> None:
    raise_nofile_limit()
    hosts = [args.http_host, args.http_host6]
    held: list[Conn] = []
    for _ in range(args.idle):
        with contextlib.suppress(OSError, TimeoutError):
            held.append(await open_conn(args.echo_host, args.echo_port, args.timeout))
    emit(event="start", held=len(held))
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    started = time.monotonic()
    rounds = 0
    while time.monotonic() - started < args.duration:
        rounds += 1
        jobs: list[Awaitable[Any]] = []
        for i in range(args.gets):
            jobs.append(http_get(hosts[i % 2], args.http_port, "/small", args.timeout))
        jobs.append(http_get(args.http_host, args.http_port, f"/bytes/{args.big}", args.timeout))
        jobs.append(http_upload(args.http_host, args.http_port, args.big, args.timeout))
        jobs.append(refused(args.http_host, args.closed_port, args.timeout))
        for i in range(args.echoes):
            jobs.append(echo_session(args.echo_host, args.echo_port, i, args.timeout))
        udp_ends: list[float] = []
        jobs += udp_and_dns_jobs(args, rounds, udp_ends)
        ok, errs = await gather_counted(jobs, args.timeout * 2)
        # The held connections must stay usable.
        alive, errs_idle = await gather_counted(
            [echo_once(c, b"!", args.timeout) for c in held], args.timeout
        )
        totals["ok"] += ok + alive
        totals["failed"] += len(jobs) - ok + len(held) - alive
        errors.update(errs)
        errors.update(errs_idle)
        if udp_ends:  # let the round's UDP sessions run idle and close before the sample
            await asyncio.sleep(max(0.0, max(udp_ends) + args.udp_settle - time.monotonic()))
        emit(event="round", n=rounds, t=round(time.monotonic() - started, 2), ok=ok + alive,
             failed=len(jobs) - ok + len(held) - alive)  # fmt: skip
        await asyncio.sleep(args.pause)
    await gather_counted([close_conn(c) for c in held], args.timeout)
    emit(event="done", rounds=rounds, ok=totals["ok"], failed=totals["failed"],
         errors=dict(errors.most_common(5)))  # fmt: skip


def udp_and_dns_jobs(
    args: argparse.Namespace, round_no: int, udp_ends: list[float]
) -> list[Awaitable[Any]]:
    """A round's UDP echo sessions (each end time goes to `udp_ends`) and DNS queries: new
    names (cache misses, so the cache keeps turning over), a name asked every round (cache
    hits), a TXT, a name that does not exist, and one query over TCP."""
    jobs: list[Awaitable[Any]] = []
    if args.udp_port:
        hosts = [args.udp_host, args.udp_host6]

        async def udp(i: int) -> None:
            try:
                await soakudp.udp_echo_session(hosts[i % 2], args.udp_port, i, args.timeout)
            finally:
                udp_ends.append(time.monotonic())

        jobs += [udp(round_no * 100 + i) for i in range(args.udp_sessions)]
    if args.dns_server:
        server, name, expect = args.dns_server, args.dns_name, args.dns_expect
        asks = [(f"r{round_no}-{i}.{name}", "A", expect) for i in range(args.dns_new_names)]
        asks += [(name, "A", expect), (name, "TXT", None)]
        asks.append((f"nope-{round_no}.{name.split('.', 1)[-1]}", "A", "NXDOMAIN"))
        jobs += [soakudp.dns_udp(server, n, t, e, args.timeout) for n, t, e in asks]
        jobs.append(soakudp.dns_tcp(server, name, "A", expect, args.timeout))
    return jobs


async def echo_session(host: str, port: int, seed: int, timeout: float) -> None:
    conn = await open_conn(host, port, timeout)
    try:
        await echo_once(conn, pattern(4096 + seed * 512, seed), timeout)
    finally:
        await close_conn(conn)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load")
    load.add_argument("--host", required=True)
    load.add_argument("--port", type=int, required=True)
    load.add_argument("-n", type=int, default=10_000)
    load.add_argument("-c", type=int, default=200, help="connects in flight at a time")
    load.add_argument("--idle-fraction", type=float, default=0.5)
    load.add_argument("--bytes", type=int, default=16 * 1024)
    load.add_argument("--data-c", type=int, default=500, help="data exchanges in flight")
    load.add_argument("--connect-timeout", type=float, default=20.0)
    load.add_argument("--step-timeout", type=float, default=60.0)
    burst = sub.add_parser("burst")
    burst.add_argument("--host", required=True)
    burst.add_argument("--port", type=int, required=True)
    burst.add_argument("-n", type=int, default=10_000)
    burst.add_argument("--bytes", type=int, default=64)
    burst.add_argument("--timeout", type=float, default=60.0, help="per connection step")
    burst.add_argument("--step-timeout", type=float, default=120.0, help="for the whole burst")
    probe = sub.add_parser("probe")
    probe.add_argument("--host", required=True)
    probe.add_argument("--port", type=int, required=True)
    probe.add_argument("--duration", type=float, default=10.0)
    probe.add_argument("--interval", type=float, default=0.1)
    probe.add_argument("--timeout", type=float, default=5.0)
    soak = sub.add_parser("soak")
    soak.add_argument("--http-host", required=True)
    soak.add_argument("--http-host6", required=True)
    soak.add_argument("--http-port", type=int, default=8080)
    soak.add_argument("--echo-host", required=True)
    soak.add_argument("--echo-port", type=int, required=True)
    soak.add_argument("--closed-port", type=int, default=9)
    soak.add_argument("--duration", type=float, default=60.0)
    soak.add_argument("--pause", type=float, default=0.6)
    soak.add_argument("--idle", type=int, default=50, help="connections held throughout")
    soak.add_argument("--gets", type=int, default=20, help="small GETs per round")
    soak.add_argument("--echoes", type=int, default=10, help="echo sessions per round")
    soak.add_argument("--big", type=int, default=1 << 20, help="bytes down and up per round")
    soak.add_argument("--timeout", type=float, default=15.0)
    soak.add_argument("--udp-host", help="UDP echo server (IPv4); no UDP without --udp-port")
    soak.add_argument("--udp-host6", help="UDP echo server (IPv6)")
    soak.add_argument("--udp-port", type=int, default=0)
    soak.add_argument("--udp-sessions", type=int, default=4, help="new UDP sockets per round")
    soak.add_argument(
        "--udp-settle", type=float, default=0.0, help="seconds from the last datagram to the end"
    )
    soak.add_argument("--dns-server", help="resolver to query; no DNS without it")
    soak.add_argument("--dns-name", default="name.test", help="a name with A and TXT records")
    soak.add_argument("--dns-expect", help="the A record of --dns-name and its subdomains")
    soak.add_argument("--dns-new-names", type=int, default=6, help="new names per round")
    args = parser.parse_args()
    commands = {"load": cmd_load, "burst": cmd_burst, "probe": cmd_probe, "soak": cmd_soak}
    asyncio.run(commands[args.command](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
