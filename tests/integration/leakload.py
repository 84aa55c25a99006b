"""The leak audit's workload, run as a script inside the bed's client namespace.

One pass of everything that tends to slip around a tunnel: TCP and IPv6 GETs, DNS over UDP to
20 resolver addresses, DNS over TLS (a TCP connect to port 853), ping (v4 and v6), QUIC-like
UDP to port 443, mDNS (224.0.0.251:5353) and LLMNR (224.0.0.252:5355) multicast. Prints one
JSON object: for each step "ok" or the error, so the test can tell "went through the tunnel"
from "blocked". Every wait is bounded (about 1 s a step); all addresses are the bed's.

    python3 leakload.py TARGET_V4 TARGET_V6 HTTP_PORT RESOLVER_PREFIX [--loop SECONDS]

With --loop, passes repeat until SECONDS have gone by (the last pass's results are printed).
"""

from __future__ import annotations

import functools
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable

WAIT_S = 1.0


def _dns_query(name: str, query_id: int) -> bytes:
    """RFC 1035 4.1: header (RD set), one question for NAME IN A."""
    header = struct.pack("!6H", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return header + labels + b"\x00" + struct.pack("!2H", 1, 1)


def _get(family: int, host: str, port: int) -> str:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT_S * 2)
        sock.connect((host, port))
        sock.sendall(b"GET /peer HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    if not reply.startswith(b"HTTP/1.0 200") and not reply.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"reply {reply[:30]!r}")
    return "ok"


def _connect(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=WAIT_S):
        return "ok"


def _udp(family: int, host: str, port: int, payload: bytes, ttl: int | None = None) -> str:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if ttl is not None:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.sendto(payload, (host, port))
    return "ok"


def _ping(args: list[str]) -> str:
    proc = subprocess.run(
        ["ping", "-n", "-c", "1", "-W", "1", *args],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    if proc.returncode != 0:
        raise ConnectionError((proc.stderr or proc.stdout).strip().splitlines()[-1:])
    return "ok"


def main() -> None:
    target, target6, http_port, resolver_prefix = sys.argv[1:5]
    port = int(http_port)
    steps: dict[str, Callable[[], str]] = {
        "tcp": lambda: _get(socket.AF_INET, target, port),
        "tcp6": lambda: _get(socket.AF_INET6, target6, port),
        "dot": lambda: _connect(target, 853),
        "ping": lambda: _ping([target]),
        "ping6": lambda: _ping(["-6", target6]),
        "quic": lambda: _udp(socket.AF_INET, target, 443, b"\xc0" + bytes(1199)),
        "quic6": lambda: _udp(socket.AF_INET6, target6, 443, b"\xc0" + bytes(1199)),
        "mdns": lambda: _udp(socket.AF_INET, "224.0.0.251", 5353, _dns_query("x.local", 0), 255),
        "llmnr": lambda: _udp(socket.AF_INET, "224.0.0.252", 5355, _dns_query("x", 1), 1),
    }
    for index in range(1, 21):
        resolver = f"{resolver_prefix}{index}"
        query = _dns_query("leak.test", index)
        steps[f"dns {resolver}"] = functools.partial(_udp, socket.AF_INET, resolver, 53, query)
    loop_s = float(sys.argv[6]) if sys.argv[5:6] == ["--loop"] else 0.0
    deadline = time.monotonic() + loop_s
    while True:
        results: dict[str, str] = {}
        for name, step in steps.items():
            try:
                results[name] = step()
            except (OSError, subprocess.SubprocessError) as exc:
                results[name] = f"error: {exc}"
        if time.monotonic() >= deadline:
            break
    print(json.dumps(results))


if __name__ == "__main__":
    main()
