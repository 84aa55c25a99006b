"""Unprivileged namespaces for ``tun2socks exec``: the few system calls Python 3.11 lacks.

``enter(uid, gid)`` moves the calling (single-threaded, freshly forked) process into new user,
network and mount namespaces, maps its own uid and gid to themselves (user_namespaces(7): a
process may write a one-line map of its own ids, after ``setgroups`` is denied), and leaves it
with every capability inside them, none outside. ``bind_file`` puts a private file over another
(a private ``/etc/resolv.conf``) in the new mount namespace only. ``die_with_parent`` makes the
kernel kill the process when its parent dies, so a killed tun2socks leaves no command behind.

When the kernel forbids unprivileged user namespaces, ``NamespaceError`` says which setting
does: ``kernel.unprivileged_userns_clone`` (Debian's patch), ``user.max_user_namespaces`` or
``kernel.apparmor_restrict_unprivileged_userns`` (Ubuntu 23.10 and later).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from pathlib import Path

CLONE_NEWNS = 0x00020000  # linux/sched.h
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000  # linux/mount.h
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_libc = ctypes.CDLL(None, use_errno=True)
_SYSCTLS = Path("/proc/sys")


class NamespaceError(Exception):
    """The namespaces cannot be made; str() is one line naming the cause (and the sysctl)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _sysctl(name: str) -> str | None:
    try:
        return (_SYSCTLS / name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def forbidding_sysctls() -> list[str]:
    """The settings that forbid unprivileged user namespaces here, as ``name = value``."""
    found = []
    for name, forbids in (
        ("kernel.unprivileged_userns_clone", "0"),
        ("user.max_user_namespaces", "0"),
        ("kernel.apparmor_restrict_unprivileged_userns", "1"),
    ):
        if _sysctl(name) == forbids:
            found.append(f"{name} = {forbids}")
    return found


def _forbidden(exc: OSError, step: str) -> NamespaceError:
    found = forbidding_sysctls()
    if found:
        why = "forbidden by sysctl " + " and ".join(found)
    elif exc.errno == errno.ENOSPC:
        why = "user.max_user_namespaces (of this or an enclosing user namespace) is exhausted"
    else:
        why = (
            "this kernel forbids unprivileged user namespaces (see sysctl "
            "kernel.unprivileged_userns_clone, user.max_user_namespaces, "
            "kernel.apparmor_restrict_unprivileged_userns)"
        )
    return NamespaceError(f"cannot create a user namespace ({step}: {exc.strerror}): {why}")


def enter(uid: int, gid: int) -> None:
    """New user, network and mount namespaces for this process, with ``uid``/``gid`` kept."""
    try:
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS), "unshare")
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EUSERS):
            raise _forbidden(exc, "unshare") from None
        raise NamespaceError(f"cannot create namespaces: {exc.strerror}") from None
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    except OSError as exc:  # AppArmor's restriction shows here, not at unshare
        raise _forbidden(exc, "writing the id maps") from None
    try:
        # Nothing mounted here may reach the parent's mount namespace.
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount")
    except OSError as exc:
        if exc.errno == errno.EPERM and forbidding_sysctls():  # AppArmor: no capabilities
            raise _forbidden(exc, "mount") from None
        raise NamespaceError(f"cannot make the mount namespace private: {exc.strerror}") from None


def restriction_note() -> str:
    """`` (unprivileged user namespaces are restricted here: ...)`` or empty: for the
    messages of a later step that failed for want of a capability."""
    found = forbidding_sysctls()
    if not found:
        return ""
    return f" (unprivileged user namespaces are restricted here: sysctl {', '.join(found)})"


def bind_file(source: str, target: str) -> None:
    """Bind-mount ``source`` over ``target`` (a symlink is followed to the file it names)."""
    real = os.path.realpath(target)
    try:
        _check(_libc.mount(source.encode(), real.encode(), None, MS_BIND, None), "mount")
    except OSError as exc:
        raise NamespaceError(
            f"cannot mount a private {target} over {real}: {exc.strerror}"
        ) from None


def die_with_parent() -> None:
    """SIGKILL this process (and what it executes) when the parent dies; raises if it did."""
    parent = os.getppid()
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    if os.getppid() != parent:  # it died before the request took effect
        raise NamespaceError("tun2socks exited during set-up")


__all__ = [
    "NamespaceError",
    "bind_file",
    "die_with_parent",
    "enter",
    "forbidding_sysctls",
    "restriction_note",
]
