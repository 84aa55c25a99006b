"""The child side of ``tun2socks exec``: its own namespaces and TUN, then the command.

Runs in a process just forked from tun2socks (single-threaded, as ``unshare(CLONE_NEWUSER)``
requires) and never returns:

1. asks to be killed with its parent, enters new user, network and mount namespaces as the
   same uid (``host/userns.py``), and bind-mounts the private resolv.conf (pointing at the DNS
   forwarder's address in the TUN prefix) over ``/etc/resolv.conf``, then removes that file:
   the mount keeps it alive and nothing is left on disk;
2. brings ``lo`` up, creates the TUN with its addresses and MTU (``TunDevice.open``, as
   ``tun2socks run`` does) and routes IPv4 and IPv6 by default into it;
3. sends the TUN descriptor to the parent over the socket pair (``SCM_RIGHTS``), which runs
   the data path on it (``--device fd://N``), and waits for its "go";
4. executes the command. Its uid is not 0 inside the namespace, so execve clears every
   capability: the command runs with none, as the user who started tun2socks.

A failure before step 4 is sent to the parent as one line (``E`` + text), which reports it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface
from typing import NoReturn

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tun2socks.device import DeviceError, TunDevice
from tun2socks.host import userns

RESOLV_CONF = "/etc/resolv.conf"
EXIT_SETUP_FAILED = 125  # as env(1) and others: the command never ran
EXIT_CANNOT_EXECUTE = 126  # as a shell: found but not executable
EXIT_NOT_FOUND = 127
MSG_FD = b"T"
MSG_ERROR = b"E"
MSG_GO = b"G"


@dataclass(frozen=True)
class ChildPlan:
    """Everything the child needs, decided by the parent before the fork."""

    uid: int
    gid: int
    device: str
    mtu: int
    offload: bool
    addresses: Sequence[IPv4Interface | IPv6Interface]
    resolv_conf: str | None  # a file to mount over /etc/resolv.conf, or None to keep it
    command: Sequence[str] = field(default_factory=list)


class _Failed(Exception):
    """A set-up step failed; str() is the one line for the user."""


def run(plan: ChildPlan, channel: socket.socket) -> NoReturn:
    """Set up, hand over the TUN, wait for "go", execute ``plan.command``. Never returns."""
    try:
        try:
            tun = _set_up(plan)
            socket.send_fds(channel, [MSG_FD], [tun.fileno()])
        except userns.NamespaceError as exc:
            _report(channel, str(exc))
        except (_Failed, DeviceError) as exc:  # EPERM here: AppArmor's restriction, say
            _report(channel, f"{exc}{userns.restriction_note()}")
        except (OSError, NetlinkError) as exc:
            _report(channel, f"cannot set up the namespace: {exc}{userns.restriction_note()}")
        if channel.recv(1) != MSG_GO:  # the parent gave up (its error is its own to report)
            os._exit(EXIT_SETUP_FAILED)
        channel.close()
        # Python ignores SIGPIPE and SIGXFSZ for itself: the command gets the defaults (the TUN
        # descriptor is close-on-exec and goes away with the exec).
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        _execute(plan.command)
    except BaseException:  # never return into the parent's code
        os._exit(EXIT_SETUP_FAILED)


def _report(channel: socket.socket, message: str) -> NoReturn:
    try:
        channel.send(MSG_ERROR + message.replace("\n", " ").encode(errors="replace"))
    finally:
        os._exit(EXIT_SETUP_FAILED)


def _set_up(plan: ChildPlan) -> TunDevice:
    userns.die_with_parent()
    userns.enter(plan.uid, plan.gid)
    if plan.resolv_conf is not None:
        userns.bind_file(plan.resolv_conf, RESOLV_CONF)
        os.unlink(plan.resolv_conf)  # the mount holds it; nothing stays on disk
    step = "bring up lo"
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        tun = TunDevice.open(
            plan.device, mtu=plan.mtu, addresses=list(plan.addresses), offload=plan.offload
        )
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=plan.device)[0]
            step = "add the IPv4 default route"
            ipr.route("add", family=socket.AF_INET, dst="0.0.0.0/0", oif=index)
            if any(a.version == 6 for a in plan.addresses):
                step = "add the IPv6 default route"
                ipr.route("add", family=socket.AF_INET6, dst="::/0", oif=index)
    except NetlinkError as exc:
        raise _Failed(f"cannot {step} in the namespace: {os.strerror(exc.code)}") from None
    return tun


def _execute(command: Sequence[str]) -> NoReturn:
    try:
        os.execvp(command[0], list(command))
    except OSError as exc:
        print(f"tun2socks: error: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE)


__all__ = ["EXIT_SETUP_FAILED", "MSG_ERROR", "MSG_FD", "MSG_GO", "ChildPlan", "run"]
