"""``tun2socks exec [-c FILE | --proxy URL] [--] COMMAND [ARGS...]``: one command through the
proxy, without root.

A TUN needs CAP_NET_ADMIN, but an unprivileged process may create a user namespace and a
network namespace in which it holds it (user_namespaces(7)). So a forked child makes both
(``exec_child.py``), creates the TUN there, and passes its descriptor back over a socket pair
(``SCM_RIGHTS``); this process stays in the original namespace, where the proxy is reachable,
and runs the usual data path on the descriptor (``--device fd://N``: DNS forwarder, UDP, rules,
the API when ``--set api.enabled=true`` asks for it). The child then executes COMMAND, whose
only way out is the TUN.

Signals (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH) are forwarded to
COMMAND, but not Ctrl-C and Ctrl-\\ from the terminal, which COMMAND gets itself. When COMMAND
ends, the data path stops and its exit status is exec's (128 + N when killed by signal N; 125
when the namespace could not be set up, 126/127 when COMMAND cannot run).
Nothing stays behind: what COMMAND left running in its namespaces is killed when it ends, the
namespaces die with their last process and descriptor, the child has asked to be killed with us
(PR_SET_PDEATHSIG), and the private resolv.conf is unlinked as soon as it is mounted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import tempfile
import time
from ipaddress import IPv6Interface
from typing import Any

from tun2socks import logs
from tun2socks.commands import exec_child
from tun2socks.commands.settings_options import add_settings_options
from tun2socks.config import ConfigError, Settings, load_settings
from tun2socks.host.resolver import dns_servers

log = logging.getLogger("tun2socks.exec")

TUN_DEVICE = "/dev/net/tun"
DEFAULT_DEVICE = "tun0"
# A TUN address for IPv6 when the settings give none (a ULA prefix, RFC 4193, of our own).
DEFAULT_IPV6 = IPv6Interface("fd7f:7f7f:7f7f::1/64")
HANDOVER_TIMEOUT = 30.0  # seconds for the child to create namespaces and TUN
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
# Sent by the terminal to its whole foreground process group, COMMAND included.
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT)
# Settings that exec sets itself: host routes and the host's resolver are never touched.
FORCED = {
    "route.auto": False,
    "route.system_dns": False,
    "route.include_uids": [],
    "route.exclude_uids": [],
}


class ExecError(Exception):
    """exec cannot start COMMAND; str() is the one line for the user."""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "exec",
        help="run one command through the proxy, without root",
        description="Run COMMAND in its own user and network namespaces whose only way out is "
        "a TUN served by tun2socks: every TCP connection, UDP datagram and DNS query of the "
        "command goes through the proxy. Needs no root and no capability.",
        epilog="The exit status is COMMAND's (125: the namespace could not be set up). The "
        "control API is off unless --set api.enabled=true.",
    )
    add_settings_options(
        parser,
        proxy_help="socks5:// or http://[user[:pass]@]host:port, or direct:// (proxy.url)",
        set_help="set one key, as for run (repeatable)",
        log_level_help="log.level (default warning without -c)",
    )
    parser.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="[--] COMMAND [ARGS...]", help="what to run"
    )


def build_settings(args: argparse.Namespace) -> Settings:
    if args.config is None and args.proxy is None:
        raise ConfigError(
            "a proxy URL is needed: pass --proxy socks5://HOST:PORT (direct:// for none) or -c FILE"
        )
    level = args.log_level or ("warning" if args.config is None else None)
    flags: dict[str, object] = {"proxy.url": args.proxy, "log.level": level, **FORCED}
    # Off unless asked: a second exec (or a run) would want the same port.
    overrides = ["api.enabled=false", *args.overrides]
    return load_settings(args.config, overrides, flags)


def run(args: argparse.Namespace) -> int:
    """Raises ConfigError (exit 2); prints one line and returns 125 when set-up fails."""
    command = list(args.argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ConfigError("a command is needed: tun2socks exec --proxy URL -- COMMAND [ARGS...]")
    settings = build_settings(args)
    for secret in (settings.proxy.password, settings.api.token):
        if secret is not None:
            logs.register_secret(secret.get_secret_value())
    for named in settings.proxies.values():
        if named.password is not None:
            logs.register_secret(named.password.get_secret_value())
    logs.setup(settings.log)
    try:
        return _run(settings, command)
    except ExecError as exc:
        log.error("%s", exc)
        return exec_child.EXIT_SETUP_FAILED


def _run(settings: Settings, command: list[str]) -> int:
    _check_tun_device()
    addresses = list(settings.tun.addresses)
    if not any(a.version == 6 for a in addresses):
        addresses.append(DEFAULT_IPV6)
    device = settings.tun.name if settings.tun.fd is None else DEFAULT_DEVICE
    resolv_conf = _write_resolv_conf(addresses) if settings.dns.enabled else None
    plan = exec_child.ChildPlan(
        uid=os.geteuid(),
        gid=os.getegid(),
        device=device,
        mtu=settings.tun.mtu,
        offload=settings.tun.offload,
        addresses=addresses,
        resolv_conf=resolv_conf,
        command=command,
    )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits
        ours.close()
        exec_child.run(plan, theirs)
    theirs.close()
    child = Child(pid, ours)
    try:
        fd = child.receive_tun()
        tun = settings.tun.model_copy(update={"name": f"fd://{fd}", "addresses": addresses})
        # Imported late, as by `run`: the data path is large.
        from tun2socks.app import run as run_app

        code = run_app(settings.model_copy(update={"tun": tun}), watch=child.watch)
        if child.status is None:  # the data path failed (code): COMMAND must not run without it
            log.error("the data path ended (status %d): stopping the command", code)
            child.finish()
            return exec_child.EXIT_SETUP_FAILED
        return child.exit_status()
    finally:
        child.finish()
        ours.close()
        if resolv_conf is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(resolv_conf)


def _check_tun_device() -> None:
    try:
        os.close(os.open(TUN_DEVICE, os.O_RDWR))
    except PermissionError:
        try:
            mode = f"mode {stat.S_IMODE(os.stat(TUN_DEVICE).st_mode):04o}"
        except OSError:
            mode = "not accessible"
        raise ExecError(
            f"{TUN_DEVICE} is not open to this user ({mode}): exec needs it readable and "
            f"writable by all, as Debian and Ubuntu ship it (chmod 0666 {TUN_DEVICE} as root)"
        ) from None
    except OSError as exc:
        reason = f"{exc.strerror} (is the tun module loaded?)"
        raise ExecError(f"cannot open {TUN_DEVICE}: {reason}") from None


def _write_resolv_conf(addresses: list[Any]) -> str:
    """A resolv.conf naming the forwarder's addresses in the TUN prefixes (as system_dns)."""
    servers = dns_servers(addresses)
    if not servers:
        raise ExecError("no TUN prefix has room for the DNS forwarder's address (use /30 or wider)")
    fd, path = tempfile.mkstemp(prefix="tun2socks-exec-", suffix=".resolv.conf")
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"nameserver {server}\n" for server in servers))
    os.chmod(path, 0o644)
    return path


def in_terminal_foreground() -> bool:
    """Whether this process group is the foreground of its controlling terminal: then Ctrl-C
    and Ctrl-\\ reach COMMAND (same group) from the terminal itself."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _ignore() -> None:
    pass


class Child:
    """The forked child: its TUN descriptor, its "go", its signals and its exit status."""

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel
        self.status: int | None = None  # os.waitpid status once reaped
        self.user_namespace: int | None = None

    def receive_tun(self) -> int:
        self.channel.settimeout(HANDOVER_TIMEOUT)
        try:
            message, fds, _flags, _address = socket.recv_fds(self.channel, 4096, 1)
        except TimeoutError:
            raise ExecError(f"the namespace was not ready within {HANDOVER_TIMEOUT:g} s") from None
        if fds and message == exec_child.MSG_FD:
            with contextlib.suppress(OSError):  # the child's namespaces, to clear at the end
                self.user_namespace = os.stat(f"/proc/{self.pid}/ns/user").st_ino
            return fds[0]
        for fd in fds:
            os.close(fd)
        if message.startswith(exec_child.MSG_ERROR):
            raise ExecError(message[1:].decode(errors="replace"))
        raise ExecError("the namespace set-up ended without a word")

    def watch(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        """Called by the data path once its loop runs: forward signals, stop when the child
        exits, and let the child go once the engine serves (the next loop iteration)."""
        pidfd = os.pidfd_open(self.pid)

        def exited() -> None:
            if self._reap(os.WNOHANG):
                loop.remove_reader(pidfd)
                os.close(pidfd)
                stop.set()

        loop.add_reader(pidfd, exited)
        from_terminal = TERMINAL_SIGNALS if in_terminal_foreground() else ()
        for sig in FORWARDED_SIGNALS:
            if sig in from_terminal:  # the terminal sent it to COMMAND too: once is enough
                loop.add_signal_handler(sig, _ignore)
            else:
                loop.add_signal_handler(sig, self._forward, sig)
        loop.call_soon(self._go)

    def _go(self) -> None:
        with contextlib.suppress(OSError):  # it died already: its exit is reported
            self.channel.send(exec_child.MSG_GO)

    def _forward(self, sig: int) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def _reap(self, flags: int) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, flags)
            if pid == 0:
                return False
            self.status = status
        return True

    def exit_status(self) -> int:
        self._reap(0)
        assert self.status is not None
        code = os.waitstatus_to_exitcode(self.status)
        return 128 - code if code < 0 else code

    def finish(self) -> None:
        """Make sure the child is gone (when the data path failed or was interrupted), and
        whatever it left running in its namespaces (a background job of a shell)."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._reap(0)
        if self.user_namespace is not None:
            kill_namespace(self.user_namespace)


def kill_namespace(inode: int) -> None:
    """SIGKILL every process in the user namespace ``inode`` (ours: made by the child, so its
    processes are our uid's and their /proc entries readable). A few rounds catch forks."""
    for _ in range(5):
        found = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry.name}/ns/user").st_ino != inode:
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
                found = True
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)


__all__ = ["ExecError", "add_parser", "build_settings", "run"]
