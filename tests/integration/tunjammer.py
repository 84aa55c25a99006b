"""Keep another process's TUN busy so that its writes meet EAGAIN (the EAGAIN test).

Takes a second handle on process --pid's TUN fd (pidfd_getfd) and, from --threads threads for
--seconds, writes large junk packets into it: UDP datagrams of 60,000 bytes to the TUN's own
side with a wrong checksum, which the kernel drops after taking them. While one of them is in
flight it is charged to the TUN socket's send budget; with that budget made small
(TUNSETSNDBUF), a write by the owner at that moment fails with EAGAIN.
Prints {"written": N, "eagain": E}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from tests.integration import robust_helpers as rh
from tun2socks.net.udp import UdpDatagram

VNET_HDR = bytes(10)  # no offload flags: the kernel checks the (wrong) checksum and drops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    fd = rh.grab_fd(args.pid, rh.tun_fd_number(args.pid))
    os.set_blocking(fd, False)
    src, dst = bytes((198, 18, 254, 77)), bytes((198, 18, 254, 1))
    packet = bytearray(UdpDatagram(9, 9, bytes(60_000)).build(4, src, dst))
    packet[26] ^= 0xFF  # break the UDP checksum
    counts = {"written": 0, "eagain": 0}
    deadline = time.monotonic() + args.seconds

    def jam() -> None:
        # os.writev releases the GIL: the threads' writes overlap in the kernel.
        while time.monotonic() < deadline:
            try:
                os.writev(fd, (VNET_HDR, packet))
                counts["written"] += 1
            except BlockingIOError:
                counts["eagain"] += 1

    threads = [threading.Thread(target=jam) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os.close(fd)
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
