#!/usr/bin/env python3
"""A privileged parent that opens and configures a TUN device, then hands its descriptor to a
tun2socks that runs with no privilege at all (the way Android's VpnService or a setuid helper
passes the device). Only the standard library and `ip` are used.

    sudo ./fd-parent.py --name tun0 --address 198.18.0.1/15 -- \\
        setpriv --reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all \\
        tun2socks run -c config.yaml --device 'fd://{fd}'

"{fd}" in the command is replaced by the descriptor number. The parent sets the device's
addresses, MTU and link state (tun2socks cannot: it has no CAP_NET_ADMIN), forwards SIGINT and
SIGTERM to the child and exits with its status. Routes into the device are the parent's job too.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import struct
import subprocess
import sys

TUNSETIFF = 0x400454CA  # linux/if_tun.h
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000


def open_tun(name: str, vnet_header: bool) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_header else 0)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    return fd


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="tun0")
    parser.add_argument("--address", action="append", default=[], help="repeatable, with /len")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--plain", action="store_true", help="no IFF_VNET_HDR (no offloads)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND with {fd}")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command is needed after --")

    fd = open_tun(args.name, not args.plain)
    ip("link", "set", args.name, "mtu", str(args.mtu))
    for address in args.address:
        ip("addr", "add", address, "dev", args.name, *(["nodad"] if ":" in address else []))
    ip("link", "set", args.name, "up")

    child = subprocess.Popen([part.replace("{fd}", str(fd)) for part in command], pass_fds=(fd,))
    os.close(fd)  # the child's copy keeps the device alive; it goes away when the child exits
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
