"""Point the system at the TUN, and undo it: routes, policy rules, the resolver.

Theory of operation (``route.auto``)
------------------------------------
Policy routing, as wg-quick does it. In each address family (IPv6 only when the TUN has it):

    table T (route.table)   default dev TUN
                            throw EXCLUDE             each route.exclude prefix
                            PROXY/32 via GATEWAY      each proxy address, by its path before
    rules                   5200  fwmark M lookup main                  only with route.mark
                            5201  lookup main suppress_prefixlength 0
                            5202  lookup T
    (per-user routing, route.include_uids / exclude_uids, changes 5202 or adds to 5200:
    host/uid_rules.py)

Rule 5201 consults the main table but ignores its default routes: every more specific route
there (the connected prefixes of the other interfaces, that is the local networks, and what
other programs added) keeps its path. What is left goes to table T, into the TUN, except
that a ``throw`` route hands the lookup back to the rules that follow (the main table and its
default route: the original path of the excluded prefixes), and the proxy's host route leads
where the proxy was reached before (loop prevention, way a). Sockets marked with ``route.mark``
skip all that and use the main table as it is (way b); with ``route.mark`` or
``route.bind_interface`` the proxy needs no host route and gets none. The main table itself is
never touched, so DHCP clients and network managers keep changing it as they like.

Every change is recorded before it is made (``tun2socks.host.state``); ``restore`` undoes
them in reverse order, each in its own ``try`` so that one failure skips nothing, and
``tun2socks down`` does the same from the record a killed run left. pyroute2's synchronous API
runs an event loop of its own: all of this happens before the asyncio loop starts or after it
ended.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_interface
from types import FrameType
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tun2socks.device import DeviceError, TunDevice
from tun2socks.errors import UserError
from tun2socks.host import resolver, strict, uid_rules
from tun2socks.host.state import Change, StateError, StateFile
from tun2socks.host.watch import NetlinkWatcher, ProxyRouteKeeper, best_route, main_routes

if TYPE_CHECKING:
    from tun2socks.config import Settings

log = logging.getLogger(__name__)
# pyroute2 logs every netlink message at debug level: far too much next to ours.
logging.getLogger("pyroute2").setLevel(logging.INFO)

RULE_PRIORITY = 5200  # the fwmark rule; the next two follow. Below main's 32766, above 0.
RULE_PRIORITIES = range(RULE_PRIORITY, RULE_PRIORITY + 3)
MAIN_TABLE = 254  # linux/rtnetlink.h RT_TABLE_MAIN
RTN_LOCAL = 2
ALL_MARK_BITS = 0xFFFFFFFF
DEFAULT_DST = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}
# What an undo may meet when the thing is gone already (with its device, or by hand).
GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL)


class SetupError(UserError):
    """The host cannot be set up as configured; str() is one line for the user."""


class Host:
    """The device, the lock and every host change of one run; `close` undoes it all."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.route = settings.route
        self.state: StateFile | None = None
        self.device: TunDevice | None = None
        self.handover = strict.Handover()  # route.strict: the block taken over from a crash
        self.proxy_routes: list[Change] = []  # the host-route way: kept current by `watch`
        self.kept_routes: list[Change] = []  # throw routes of route.exclude: put back by `watch`
        self.proxy_names: dict[str, list[str]] = {}  # proxy host name -> addresses at start
        self.ruled_families: list[int] = []  # the families whose traffic route.auto captures
        self.watcher: NetlinkWatcher | None = None

    @property
    def changes_system(self) -> bool:
        return self.route.auto or self.route.system_dns

    # ------------------------------------------------------------------ set up

    def open_device(self) -> TunDevice:
        """Lock the device, undo what a killed run left on it, open it. Raises SetupError or
        DeviceError."""
        signal.signal(signal.SIGTERM, _interrupt)  # until the loop's handler takes over
        tun = self.settings.tun
        if tun.fd is None:
            self._lock(tun.name)
            self.device = TunDevice.open(
                tun.name,
                mtu=tun.mtu,
                addresses=list(tun.addresses),
                offload=tun.offload,
                txqueuelen=tun.txqueuelen,
                write_thread=tun.write_thread,
            )
        else:
            self.device = TunDevice.from_fd(
                tun.fd, mtu=tun.mtu, offload=tun.offload, write_thread=tun.write_thread
            )
            self._lock(self.device.name)
        return self.device

    def _lock(self, device: str) -> None:
        if not self.changes_system:
            return  # nothing to record; a second run on the device fails to open it (EBUSY)
        state = StateFile(self.route.state_dir, device)
        try:
            state.lock()
        except StateError as exc:
            raise SetupError(str(exc)) from None
        self.state = state
        try:
            leftover = state.leftover()
        except StateError as exc:
            raise SetupError(f"{exc}; remove it once the host is checked") from None
        if leftover is not None:
            pid = leftover.get("pid", "?")
            log.warning("undoing what an earlier run (pid %s) left on %s", pid, device)
            kept: list[Change] = []
            to_undo: list[Change] = leftover["changes"]
            if self.route.strict and self.route.auto:
                kept, to_undo = strict.split_leftover(to_undo, self.route.table, RULE_PRIORITIES)
            for error in undo(to_undo):
                log.warning("could not undo: %s", error)
            if kept:
                log.warning("route.strict: keeping its block in place until set up again")
                state.adopt(kept)
                self.handover = strict.Handover(kept)
            else:
                state.remove()

    def setup(self) -> None:
        """Routes, rules and resolver for the open device. Raises SetupError, after undoing
        what it did."""
        device = self.device
        if device is None or not self.changes_system:
            return
        try:
            with IPRoute() as ipr:
                index = _link_index(ipr, device.name)
                if self.route.auto:
                    self._routes(ipr, device.name, index)
                    self._drop_unclaimed(ipr)
                if self.route.system_dns:
                    self._resolver(ipr, device.name, index)
        except NetlinkError as exc:
            self.restore()
            raise SetupError(f"cannot set up routes: {_reason(exc)}") from None
        except (SetupError, StateError, resolver.ResolverError) as exc:
            self.restore()
            raise SetupError(str(exc)) from None
        except BaseException:
            self.restore()
            raise
        log.info(
            "%s: %d host changes made", device.name, len(self.state.changes) if self.state else 0
        )

    def _routes(self, ipr: Any, device: str, index: int) -> None:
        route = self.route
        families = [socket.AF_INET]
        if _ipv6_enabled(device):
            families.append(socket.AF_INET6)
        # route.strict guards IPv6 even when the TUN has none: it must not go around the TUN.
        guarded = [socket.AF_INET, socket.AF_INET6] if route.strict else []
        ruled = sorted(set(families) | set(guarded))
        protected = bool(route.mark or route.bind_interface)
        # Before any route of ours exists: where the proxies are reached now.
        host_routes = [] if protected else self._proxy_routes(ipr, device, index, ruled)
        for args in strict.guard_routes(route.table, guarded):
            self._add(ipr, "route", **args)
        for family in families:
            self._add(
                ipr, "route", family=family, dst=DEFAULT_DST[family], oif=index, table=route.table
            )
        self.ruled_families = list(ruled)
        for family in ruled:
            for net in route.exclude:
                if _family(net.version) == family:
                    args = {
                        "family": family,
                        "dst": str(net),
                        "type": "throw",
                        "table": route.table,
                    }
                    self._add(ipr, "route", **args)
                    self.kept_routes.append({"kind": "route", "args": args})
        for args in host_routes:
            self._add(ipr, "route", **args)
            self.proxy_routes.append({"kind": "route", "args": args})
        # The last rule switches the traffic over; restore removes it first.
        for family in ruled:
            if route.mark:
                self._add(
                    ipr,
                    "rule",
                    family=family,
                    priority=RULE_PRIORITY,
                    fwmark=route.mark,
                    fwmask=ALL_MARK_BITS,
                    table=MAIN_TABLE,
                )
            for args in uid_rules.exclusion_rules(route, family, RULE_PRIORITY, MAIN_TABLE):
                self._add(ipr, "rule", **args)
            self._add(
                ipr,
                "rule",
                family=family,
                priority=RULE_PRIORITY + 1,
                table=MAIN_TABLE,
                suppress_prefixlen=0,
            )
            for args in uid_rules.tun_rules(route, family, RULE_PRIORITY + 2):
                self._add(ipr, "rule", **args)

    def _proxy_routes(
        self, ipr: Any, device: str, index: int, families: Sequence[int]
    ) -> list[dict[str, Any]]:
        routes = []
        for address in self._proxy_addresses():
            family = _family(address.version)
            if family not in families or address.is_loopback:
                continue
            try:
                reply = ipr.route("get", dst=str(address))[0]
                kind, oif = reply["type"], reply.get_attr("RTA_OIF")
                gateway = reply.get_attr("RTA_GATEWAY")
            except NetlinkError as exc:
                # A strict run's block still in place answers "unreachable": ask main alone.
                path = best_route(main_routes(ipr, family), address) if self.handover else None
                if path is None:
                    raise SetupError(
                        f"no route to the proxy {address} ({_reason(exc)}): route.auto keeps "
                        "its path, so it needs one (or set route.mark or route.bind_interface)"
                    ) from None
                kind, oif, gateway = path.type, path.oif, path.gateway
            if kind == RTN_LOCAL:
                continue  # an address of this host: the local table wins before our rules
            if oif == index:
                raise SetupError(
                    f"the proxy {address} is already routed into {device}: "
                    "remove that route, or the proxy connection would loop"
                )
            args: dict[str, Any] = {
                "family": family,
                "dst": f"{address}/{address.max_prefixlen}",
                "oif": oif,
                "table": self.route.table,
            }
            if gateway:
                args["gateway"] = gateway
            routes.append(args)
        return routes

    def _proxy_addresses(self) -> list[IPv4Address | IPv6Address]:
        configs = [self.settings.proxy, *self.settings.proxies.values()]
        hosts = [entry.host for config in configs for entry in config.entries()]  # failover too
        found: dict[IPv4Address | IPv6Address, None] = {}
        for host in hosts:
            try:
                found[ip_address(host)] = None
                continue
            except ValueError:
                pass
            try:
                infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise SetupError(f"cannot resolve the proxy host {host}: {exc}") from None
            for *_, sockaddr in infos:
                found[ip_address(sockaddr[0])] = None
            # followed by `watch`: a name may get other addresses on another network
            self.proxy_names[host] = list(dict.fromkeys(str(i[4][0]) for i in infos))
        return list(found)

    def _resolver(self, ipr: Any, device: str, index: int) -> None:
        addresses = []
        for msg in ipr.get_addr(index=index):
            iface = ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            if not iface.ip.is_link_local:
                addresses.append(iface)
        servers = resolver.dns_servers(addresses)
        if not servers:
            raise SetupError(
                f"route.system_dns: {device} has no address prefix with room for a DNS "
                "server address besides its own (use a prefix shorter than /31)"
            )
        change = resolver.plan(device, servers)
        self._record(change)
        resolver.point(change)
        log.info("resolver pointed at %s", ", ".join(servers))

    def _record(self, change: Change) -> None:
        if self.state is None:
            raise SetupError("no state file: cannot record host changes")
        self.state.record(change)

    def _add(self, ipr: Any, kind: str, **args: Any) -> None:
        change: Change = {"kind": kind, "args": args}
        if self.handover.claim(change):
            return  # made by the crashed run before, and in our record since _lock
        self._record(change)
        # A route of the crashed run in the same place (the proxy's, by another path since):
        # take its place; _drop_unclaimed then finds the old one gone.
        verb = "replace" if kind == "route" and self.handover else "add"
        try:
            getattr(ipr, kind)(verb, **args)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST and kind == "rule":
                assert self.state is not None
                self.state.forget(change)  # someone else's identical rule: not ours to remove
                log.info("kept the existing %s", describe(change))
                return
            hint = ""
            if exc.code == errno.EEXIST:
                hint = f" (is table {self.route.table} used by another program? see route.table)"
            raise SetupError(f"cannot add {describe(change)}: {_reason(exc)}{hint}") from None

    def _drop_unclaimed(self, ipr: Any) -> None:
        """What a crashed strict run left that this set-up does not make (now ours: the
        rules and routes this run needs are all in place)."""
        for change in reversed(self.handover.unclaimed()):
            _delete(ipr, change)
            assert self.state is not None
            self.state.forget(change)

    def watch(self) -> None:
        """Follow network changes while running (tun2socks.host.watch): a thread, until close."""
        if self.state is None or not self.proxy_routes or self.watcher is not None:
            return
        configs = [self.settings.proxy, *self.settings.proxies.values()]
        hosts = [e.host for config in configs for e in config.entries()]
        fixed = [host for host in hosts if host not in self.proxy_names]
        keeper = ProxyRouteKeeper(
            self.state,
            self.proxy_routes,
            kept=self.kept_routes,
            names=self.proxy_names,
            fixed=fixed,
            table=self.route.table,
            families=self.ruled_families,
        )
        self.watcher = NetlinkWatcher(keeper.refresh)
        self.watcher.start()

    # ------------------------------------------------------------------ tear down

    def restore(self) -> list[str]:
        """Undo every recorded change; the errors, each logged. The record stays if any."""
        state = self.state
        if state is None or not state.changes:
            return []
        with _signals_ignored():
            errors = undo(state.changes)
            for error in errors:
                log.error("could not undo: %s", error)
            if errors:
                log.error("run `tun2socks down` to retry; the record is %s", state.path)
            else:
                state.changes.clear()
                state.remove()
        return errors

    def close(self, *, failed: bool = False) -> None:
        """Undo the host changes, close the device, release the lock. With route.strict, a
        failed run keeps them all, as a killed one would: traffic stays blocked."""
        if self.watcher is not None:  # before the record is read or undone
            self.watcher.stop()
            self.watcher = None
        try:
            if failed and self.route.strict and self.state is not None and self.state.changes:
                log.error(
                    "route.strict: traffic stays blocked until `tun2socks down` or the next start"
                )
            else:
                self.restore()
        finally:
            if self.device is not None:
                self.device.close()
                self.device = None
            if self.state is not None:
                self.state.unlock()
                self.state = None


def undo(changes: Sequence[Change]) -> list[str]:
    """Undo `changes` newest first, each on its own; what could not be undone."""
    errors: list[str] = []
    ipr: Any = None
    try:
        for change in reversed(changes):
            try:
                kind = change["kind"]
                if kind in ("route", "rule"):
                    if ipr is None:
                        ipr = IPRoute()
                    _delete(ipr, change)
                elif kind in ("resolv_conf", "resolvectl"):
                    resolver.restore(change)
                else:
                    errors.append(f"unknown change {kind!r}")
            except NetlinkError as exc:
                errors.append(f"{describe(change)}: {_reason(exc)}")
            except Exception as exc:
                errors.append(f"{describe(change)}: {exc}")
    finally:
        if ipr is not None:
            ipr.close()
    return errors


def _delete(ipr: Any, change: Change) -> None:
    try:
        getattr(ipr, change["kind"])("del", **change["args"])
    except NetlinkError as exc:
        if exc.code not in GONE:
            raise
        log.debug("%s: gone already", describe(change))
    else:
        log.debug("removed %s", describe(change))


def describe(change: Change) -> str:
    """A change in `ip` words, for messages."""
    kind = change.get("kind")
    args = change.get("args", {})
    if args.get("family") == socket.AF_INET6:
        kind = f"{kind} -6"
    if kind in ("route", "route -6"):
        words = [args.get("type", ""), args.get("dst", "?")]
        if "gateway" in args:
            words += ["via", str(args["gateway"])]
        if "oif" in args:
            words += ["dev", f"#{args['oif']}"]
        return f"{kind} " + " ".join(w for w in words if w) + f" table {args.get('table')}"
    if kind in ("rule", "rule -6"):
        words = [f"{args.get('priority')}:"]
        if "fwmark" in args:
            words.append(f"fwmark {args['fwmark']:#x}")
        if "uid_range" in args:
            words.append(f"uidrange {str(args['uid_range']).replace(':', '-')}")
        words.append(f"lookup {args.get('table')}")
        if "suppress_prefixlen" in args:
            words.append(f"suppress_prefixlength {args['suppress_prefixlen']}")
        return f"{kind} " + " ".join(words)
    if kind == "resolv_conf":
        return f"resolver file {change.get('path')}"
    if kind == "resolvectl":
        return f"resolvectl settings of {change.get('link')}"
    return f"change {kind}"


def _family(version: int) -> int:
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def _link_index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise SetupError(f"device {name} not found in this network namespace")
    return int(found[0])


def _ipv6_enabled(device: str) -> bool:
    try:
        with open(f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def _reason(exc: NetlinkError) -> str:
    if exc.code in (errno.EPERM, errno.EACCES):
        return "permission denied (needs root or CAP_NET_ADMIN)"
    return os.strerror(exc.code)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """No Ctrl-C or SIGTERM may cut a restore short and leave half the changes."""
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


__all__ = ["DeviceError", "Host", "SetupError", "describe", "undo"]
