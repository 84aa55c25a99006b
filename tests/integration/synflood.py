"""Write a SYN flood into the TUN (run as a script in the client namespace, as root).

SYNs with random source addresses inside --prefix (random ports and sequence numbers) go out
through a raw socket (IP_HDRINCL) to --dst; the namespace routes them into the TUN, so they
are exactly what tun2socks reads. Its answers (SYN-ACK or RST) are addressed to the random
sources: the kernel gets them from the TUN and drops them (forwarding is off), and a packet
socket on the TUN counts them first.

The sender keeps the TUN's kernel queue from overflowing: it sends in small batches and backs
off when the device's tx_dropped counter grows, until --count SYNs were queued to the TUN or
--timeout passed. Prints one JSON object: sent, delivered (queued to the TUN), dropped by the
queue, answers seen (syn_ack, rst), seconds.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import struct
import sys
import time
from pathlib import Path

from tun2socks.net.tcp import SYN, TcpOptions, TcpSegment

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; not exported by the socket module
BATCH = 200


def stat(device: str, name: str) -> int:
    return int(Path(f"/sys/class/net/{device}/statistics/{name}").read_text())


def count_answers(sock: socket.socket, prefix: ipaddress.IPv4Network, seen: dict[str, int]) -> None:
    """Drain the packet socket: count SYN-ACKs and RSTs tun2socks sent to the flood sources."""
    while True:
        try:
            data, address = sock.recvfrom(256)
        except BlockingIOError:
            return
        if address[2] == PACKET_OUTGOING or len(data) < 40 or data[0] >> 4 != 4:
            continue
        if ipaddress.IPv4Address(data[16:20]) not in prefix or data[9] != 6:
            continue
        flags = data[(data[0] & 0x0F) * 4 + 13]
        if flags & 0x04:
            seen["rst"] += 1
        elif flags & 0x12 == 0x12:
            seen["syn_ack"] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True)
    parser.add_argument("--dst", required=True)
    parser.add_argument("--dport", type=int, required=True)
    parser.add_argument("--prefix", default="10.99.0.0/16")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=20_000.0, help="initial SYNs per second")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    prefix = ipaddress.IPv4Network(args.prefix)
    dst = ipaddress.IPv4Address(args.dst).packed
    rng = random.Random(8)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sniff.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 * 1024 * 1024)
    sniff.bind((args.device, 0))
    sniff.setblocking(False)
    options = TcpOptions(mss=1460, wscale=7, sack_permitted=True)
    base = int(prefix.network_address)
    seen = {"rst": 0, "syn_ack": 0}
    tx0, drop0 = stat(args.device, "tx_packets"), stat(args.device, "tx_dropped")
    sent = 0
    rate = args.rate
    started = time.monotonic()
    deadline = started + args.timeout
    while time.monotonic() < deadline:
        delivered = stat(args.device, "tx_packets") - tx0
        if delivered >= args.count:
            break
        dropped_before = stat(args.device, "tx_dropped")
        for _ in range(BATCH):
            src = struct.pack("!I", base + rng.randrange(1, prefix.num_addresses - 1))
            segment = TcpSegment(
                rng.randrange(1024, 65536), args.dport, rng.getrandbits(32), 0, SYN, 64240,
                options=options,
            )  # fmt: skip
            packet = segment.build(4, src, dst)
            raw.sendto(packet, (args.dst, 0))
        sent += BATCH
        count_answers(sniff, prefix, seen)
        # Back off while the TUN's queue overflows; speed up again while it does not.
        rate = rate * 0.7 if stat(args.device, "tx_dropped") > dropped_before else rate * 1.05
        time.sleep(BATCH / max(rate, 500.0))
    time.sleep(1.0)
    count_answers(sniff, prefix, seen)
    result = {
        "sent": sent,
        "delivered": stat(args.device, "tx_packets") - tx0,
        "queue_dropped": stat(args.device, "tx_dropped") - drop0,
        "seconds": round(time.monotonic() - started, 1),
        **seen,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
