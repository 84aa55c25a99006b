"""A TCP client for the stack's conformance tests, run as a script in a bed namespace.

Each subcommand prints one JSON object on stdout and exits 0 (failures are data):

  get        GET /bytes/N; the byte count and its sha256.
  stall      GET /bytes/N with a small receive buffer, read nothing for S seconds (the
             window stays 0), then read everything.
  idle-get   connect, stay silent for S seconds, then GET /small on that connection.

Every wait is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import time


def _connect(host: str, port: int, timeout: float, rcvbuf: int | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def _read_response(sock: socket.socket, deadline: float) -> bytes:
    """The body after the headers."""
    data = bytearray()
    while time.monotonic() < deadline:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    _head, _, body = bytes(data).partition(b"\r\n\r\n")
    return body


def _get(sock: socket.socket, path: str, host: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["get", "stall", "idle-get"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    result: dict[str, object] = {}
    try:
        deadline = time.monotonic() + args.timeout + args.seconds
        rcvbuf = 16384 if args.command == "stall" else None
        sock = _connect(args.host, args.port, args.timeout, rcvbuf)
        if args.command == "idle-get":
            time.sleep(args.seconds)
            _get(sock, "/small", args.host)
        else:
            _get(sock, f"/bytes/{args.size}", args.host)
            if args.command == "stall":
                time.sleep(args.seconds)  # the reply fills the buffer: the window goes to 0
        body = _read_response(sock, deadline)
        result.update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
        result["body"] = body.decode(errors="replace") if args.command == "idle-get" else ""
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
