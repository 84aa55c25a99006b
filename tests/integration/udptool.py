"""UDP server and clients for the bed, run as a script inside a namespace.

  serve      a UDP echo server on two ports, dual stack (v4 and v6 on one socket each). A
             datagram that starts with b"OTHER" is answered from the OTHER port as well, so a
             client can check endpoint-independent mapping (a reply from a peer it never wrote
             to must reach it). Runs until killed.

The client subcommands print one JSON object on stdout and exit 0 (failures are data):

  echo       send COUNT datagrams of sizes up to MAX_SIZE (random bytes), one at a time; each
             reply must match byte for byte. A lost datagram is sent again (at most --retries
             in total); the answer reports matched, mismatched, lost and retries.
  other-port send b"OTHER..." to PORT, report every (port, payload) that came back.
  fan-out    from one socket, send a datagram to each of PORTS; report the ports that answered.
  refused    send one datagram and wait for the reply or an error: reports the errno name
             (ECONNREFUSED when an ICMP port unreachable came back) and the seconds it took.

Every wait is bounded by a timeout given on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import random
import selectors
import socket
import sys
import time

OTHER = b"OTHER"


def serve(args: argparse.Namespace) -> None:
    socks = []
    for port in args.ports:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind(("::", port))
        socks.append(sock)
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, index)
    print(f"listening on {args.ports}", flush=True)
    while True:
        for key, _ in selector.select():
            receiver = socks[key.data]
            data, peer = receiver.recvfrom(65535)
            if data.startswith(OTHER):
                for other in socks:
                    if other is not receiver:
                        other.sendto(data, peer)
            else:
                receiver.sendto(data, peer)


def _sizes(count: int, max_size: int, rng: random.Random) -> list[int]:
    """Sizes that cross the interesting boundaries (one MTU, several fragments, the maximum)."""
    fixed = [1, 8, 1232, 1452, 1472, 1473, 1480, 1500, 2960, 4000, max_size]
    sizes = [s for s in fixed if s <= max_size]
    while len(sizes) < count:
        sizes.append(rng.randint(1, max_size))
    return sizes[:count]


def echo(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    matched = mismatched = lost = retries = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((args.host, args.port))
        sock.settimeout(args.timeout)
        for size in _sizes(args.count, args.max_size, rng):
            payload = rng.randbytes(size)
            while True:
                sock.send(payload)
                try:
                    reply = sock.recv(65535)
                    # A late reply to an earlier, retried datagram is not an answer to this one.
                    while reply != payload and len(reply) != len(payload):
                        reply = sock.recv(65535)
                except TimeoutError:
                    if retries >= args.retries:
                        lost += 1
                        break
                    retries += 1
                    continue
                if reply == payload:
                    matched += 1
                else:
                    mismatched += 1
                break
    return {"matched": matched, "mismatched": mismatched, "lost": lost, "retries": retries}


def other_port(args: argparse.Namespace) -> dict[str, object]:
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    replies: set[tuple[int, str]] = set()

    def from_elsewhere() -> bool:
        return any(port != args.port for port, _ in replies)

    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and not from_elsewhere():
            sock.sendto(OTHER + b" mapping check", (args.host, args.port))
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                while not from_elsewhere():
                    data, peer = sock.recvfrom(65535)
                    replies.add((peer[1], data.decode()))
    return {"replies": sorted([port, text] for port, text in replies)}


def fan_out(args: argparse.Namespace) -> dict[str, object]:
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    answered: set[int] = set()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and len(answered) < len(args.ports):
            for port in set(args.ports) - answered:
                sock.sendto(b"fan-out", (args.host, port))
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                while len(answered) < len(args.ports):
                    answered.add(sock.recvfrom(65535)[1][1])
    return {"answered": sorted(answered)}


def refused(args: argparse.Namespace) -> dict[str, object]:
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    started = time.monotonic()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((args.host, args.port))
        sock.settimeout(args.timeout)
        try:
            sock.send(b"anyone there?")
            data = sock.recv(65535)
        except TimeoutError:
            return {"error": "timeout", "seconds": time.monotonic() - started}
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            return {"error": name, "seconds": time.monotonic() - started}
    return {"error": None, "reply": data.decode(errors="replace")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("ports", type=int, nargs=2)
    p = sub.add_parser("fan-out")
    p.add_argument("host")
    p.add_argument("ports", type=int, nargs="+")
    p.add_argument("--timeout", type=float, default=5.0)
    for name in ("echo", "other-port", "refused"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=5.0)
        if name == "echo":
            p.add_argument("--count", type=int, default=100)
            p.add_argument("--max-size", type=int, default=8192)
            p.add_argument("--retries", type=int, default=5)
            p.add_argument("--seed", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args)
        return 0
    handlers = {"echo": echo, "other-port": other_port, "fan-out": fan_out, "refused": refused}
    handler = handlers[args.command]
    print(json.dumps(handler(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
