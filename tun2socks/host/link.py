"""The TUN's link, configured over netlink: MTU, addresses, link up.

IPv6 addresses are added without duplicate address detection and waited for until their local
route exists, so that packets to them are delivered as soon as this returns.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Sequence
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

# linux/if_addr.h: no duplicate address detection, so IPv6 addresses are usable at once.
IFA_F_NODAD = 0x02
RTN_LOCAL = 2  # linux/rtnetlink.h: route type of our own addresses
IPV6_READY_TIMEOUT = 2.0  # seconds


class LinkError(Exception):
    """The link cannot be configured; str() is one line for the user."""


def link_exists(name: str) -> bool:
    # An ioctl on a socket of the current netns; /sys/class/net may belong to another netns.
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def configure_link(
    name: str,
    mtu: int,
    addresses: Sequence[IPv4Interface | IPv6Interface],
    txqueuelen: int | None = None,
) -> None:
    """Set the MTU (and the queue length when given), add the addresses (present ones are
    kept) and bring the link up.

    Raises LinkError."""
    step = "look up"
    try:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=name)[0]
            step = f"set mtu {mtu} on"
            ipr.link("set", index=index, mtu=mtu)
            if txqueuelen is not None:  # the kernel's queue toward us (config/tun2socks.yaml)
                step = f"set txqueuelen {txqueuelen} on"
                ipr.link("set", index=index, txqlen=txqueuelen)
            for iface in addresses:
                step = f"add address {iface} to"
                args: dict[str, object] = {
                    "index": index,
                    "address": str(iface.ip),
                    "prefixlen": iface.network.prefixlen,
                }
                if iface.version == 6:
                    args["flags"] = IFA_F_NODAD
                try:
                    ipr.addr("add", **args)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
            step = "bring up"
            ipr.link("set", index=index, state="up")
            step = "wait for the IPv6 addresses of"
            _wait_ipv6_local_routes(ipr, name, [a for a in addresses if a.version == 6])
    except NetlinkError as exc:
        if exc.code in (errno.EPERM, errno.EACCES):
            raise LinkError(f"cannot {step} {name}: need root or CAP_NET_ADMIN") from None
        raise LinkError(f"cannot {step} {name}: {os.strerror(exc.code)}") from None
    except (OSError, IndexError) as exc:
        raise LinkError(f"cannot {step} {name}: {exc}") from None


def _wait_ipv6_local_routes(ipr: Any, name: str, addresses: Sequence[IPv6Interface]) -> None:
    # The kernel installs an IPv6 address's local route from a workqueue, even with NODAD:
    # packets to the address are dropped until then, so return only once it is there.
    deadline = time.monotonic() + IPV6_READY_TIMEOUT
    for iface in addresses:
        while ipr.route("get", dst=str(iface.ip))[0]["type"] != RTN_LOCAL:
            if time.monotonic() > deadline:
                log.warning("TUN %s: address %s not usable yet", name, iface)
                return
            time.sleep(0.002)
