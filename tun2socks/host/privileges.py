"""``run --user NAME``: the data path runs as an unprivileged user once the host is set up.

The privileged part is only set-up and tear-down (device, routes, rules, resolver). So the
process splits, as sshuttle splits off its firewall process: the parent keeps root, forks a
child that drops to NAME and runs the data path, forwards SIGINT/SIGTERM to it, waits, and
then undoes the host changes itself. The child keeps CAP_NET_ADMIN only when it must set
``SO_MARK`` (``route.mark``), and no other capability. If the parent is killed, the child
keeps serving until stopped, and ``tun2socks down`` cleans up as after any killed run.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pwd
import signal
import sys
import traceback
from collections.abc import Callable
from types import FrameType

from tun2socks.errors import UserError

log = logging.getLogger(__name__)

PR_SET_KEEPCAPS = 8  # linux/prctl.h
PR_SET_NO_NEW_PRIVS = 38
CAP_NET_ADMIN = 12  # linux/capability.h
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(UserError):
    """The data path cannot run as the user asked for; str() is one line."""


def lookup(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"--user {user}: no such user") from None


def run_as(user: str, body: Callable[[], int], *, keep_net_admin: bool) -> int:
    """Run `body` in a child process as `user`; its exit status."""
    entry = lookup(user)
    _preload()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's frames
        code = 1
        try:
            drop(entry, keep_net_admin=keep_net_admin)
            log.info("data path running as %s (uid %d)", user, entry.pw_uid)
            code = body()
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            traceback.print_exc()
        finally:
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code)
    return _wait(pid)


def drop(entry: pwd.struct_passwd, *, keep_net_admin: bool) -> None:
    """Become `entry`'s user and group, keeping CAP_NET_ADMIN if asked, nothing else."""
    libc = ctypes.CDLL(None, use_errno=True)
    if keep_net_admin and libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise PrivilegeError(f"prctl(PR_SET_KEEPCAPS): {os.strerror(ctypes.get_errno())}")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if keep_net_admin:
        _set_capabilities(libc, 1 << CAP_NET_ADMIN)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary can give anything back


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _set_capabilities(libc: ctypes.CDLL, mask: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # version 3: two 32-bit halves
    data[0].effective = data[0].permitted = mask
    if libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capset: {os.strerror(ctypes.get_errno())}")


def _preload() -> None:
    # The child may no longer read the interpreter's files (e.g. under /root): import now what
    # the data path would import lazily.
    import asyncio.base_events  # noqa: F401
    import concurrent.futures.thread  # noqa: F401  (getaddrinfo's executor)
    import encodings.idna  # noqa: F401


def _wait(pid: int) -> int:
    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    saved = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _, status = os.waitpid(pid, 0)  # retried by Python after each forwarded signal
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
