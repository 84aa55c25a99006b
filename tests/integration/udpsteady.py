"""One UDP socket that keeps talking to an echo server, for the network-change test.

    python3 -m tests.integration.udpsteady HOST PORT SECONDS [INTERVAL]

Sends a small datagram (a sequence number) every INTERVAL seconds (default 0.05) from the
same socket, i.e. the same client endpoint, hence the same UDP session in tun2socks, for
SECONDS, and records the wall-clock time of each echo that comes back. Prints one JSON
object: {"sent": N, "replies": [time, ...]}. A network change shows as a gap in the
replies; the test asks how soon after each change they resume. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time


def main(argv: list[str]) -> int:
    host, port, seconds = argv[0], int(argv[1]), float(argv[2])
    interval = float(argv[3]) if len(argv) > 3 else 0.05
    replies: list[float] = []
    sent = 0
    end = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        next_send = time.monotonic()
        while (now := time.monotonic()) < end:
            if now >= next_send:
                with contextlib.suppress(OSError):  # an ICMP error of an earlier datagram
                    sock.send(sent.to_bytes(4, "big"))
                sent += 1
                next_send = now + interval
            sock.settimeout(max(0.001, min(next_send, end) - time.monotonic()))
            try:
                if sock.recv(64):
                    replies.append(time.time())
            except (TimeoutError, OSError):
                continue
    print(json.dumps({"sent": sent, "replies": replies}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
