"""Clients for the failover test, run as a script inside the bed's client namespace.

    python3 failoverload.py HOST PORT CLIENTS SECONDS

CLIENTS threads each open a new TCP connection in a loop for SECONDS, send ``GET /peer`` and
read the answer (the address the proxy connected from, which names the proxy). Prints one
JSON object: the wall-clock start and one row per attempt [start, connect seconds, total
seconds, peer or "error: ..."]. Every wait is bounded (5 s).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

WAIT_S = 5.0


def attempt(host: str, port: int) -> tuple[float, float, str]:
    began = time.time()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT_S)
        sock.connect((host, port))
        connected = time.time() - began
        sock.sendall(b"GET /peer HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise ConnectionError(f"reply {reply[:40]!r}")
    return connected, time.time() - began, body.decode().strip()


def main() -> None:
    host, port, clients, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    start = time.time()
    deadline = start + float(seconds)
    rows: list[list[object]] = []
    lock = threading.Lock()

    def client() -> None:
        while time.time() < deadline:
            began = time.time()
            try:
                connected, total, peer = attempt(host, port)
            except OSError as exc:
                row: list[object] = [
                    began,
                    time.time() - began,
                    time.time() - began,
                    f"error: {exc}",
                ]
            else:
                row = [began, connected, total, peer]
            with lock:
                rows.append(row)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"start": start, "rows": rows}))


if __name__ == "__main__":
    main()
