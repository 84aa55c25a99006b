"""Point the system's resolver at the TUN (``route.system_dns``), and put it back.

Two ways, chosen by what the host runs:
- systemd-resolved (``/etc/resolv.conf`` links into ``/run/systemd/resolve/``): ``resolvectl``
  gives the TUN link the DNS server and the routing domain ``~.`` with the default route, so all
  names go there; ``resolvectl revert`` undoes it (and the link's settings vanish with it anyway).
- otherwise ``/etc/resolv.conf`` itself: its content (or the symlink it was) is kept in the
  change record, the file is rewritten in place (which also works on a bind mount, as
  ``ip netns exec`` makes), and the backup is written back on exit, unless something else
  (a DHCP client) rewrote the file meanwhile: then the newer content is left alone.

The server is an address inside the TUN's prefix other than the TUN's own (the first one after
it), so queries enter the TUN, where the DNS forwarder answers them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path

from tun2socks.errors import UserError
from tun2socks.host.state import Change

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_DIR = "/run/systemd/resolve/"
RESOLVECTL_TIMEOUT = 10.0  # seconds
MARKER = "# written by tun2socks (route.system_dns); restored when it exits\n"


class ResolverError(UserError):
    """The system resolver cannot be pointed at the forwarder; str() is one line."""


def dns_servers(addresses: Iterable[IPv4Interface | IPv6Interface]) -> list[str]:
    """One server address per TUN prefix that has room for one besides the TUN's own."""
    servers: list[str] = []
    for iface in addresses:
        network = iface.network
        if network.num_addresses < (4 if iface.version == 4 else 2):
            continue
        candidate: IPv4Address | IPv6Address = iface.ip + 1
        if candidate not in network or (iface.version == 4 and candidate == network[-1]):
            candidate = iface.ip - 1
        if candidate in network and candidate != network.network_address:
            servers.append(str(candidate))
    return servers


def uses_resolved(resolv_conf: Path = RESOLV_CONF) -> bool:
    try:
        target = os.readlink(resolv_conf)
    except OSError:
        return False
    resolved = str((resolv_conf.parent / target).resolve()).startswith(RESOLVED_DIR)
    return resolved and shutil.which("resolvectl") is not None


def point(change: Change) -> None:
    """Make the change that `plan` described (and the caller recorded)."""
    servers = change["servers"]
    if change["kind"] == "resolvectl":
        device = change["link"]
        _resolvectl("dns", device, *servers)
        _resolvectl("domain", device, "~.")
        _resolvectl("default-route", device, "yes")
        return
    path = Path(change["path"])
    text = change["written"]
    if change["symlink"] is not None:
        tmp = path.with_name(path.name + ".tun2socks")
        tmp.write_text(text)
        os.replace(tmp, path)  # replaces the link itself, not what it points to
    else:
        with open(path, "w") as f:  # in place: keeps the inode and any bind mount
            f.write(text)


def plan(device: str, servers: Sequence[str], resolv_conf: Path = RESOLV_CONF) -> Change:
    """The change record for pointing the resolver at `servers`, with the backup of what is
    there now: recorded before anything is changed."""
    if uses_resolved(resolv_conf):
        return {"kind": "resolvectl", "link": device, "servers": list(servers)}
    written = MARKER + "".join(f"nameserver {server}\n" for server in servers)
    change: Change = {
        "kind": "resolv_conf",
        "path": str(resolv_conf),
        "servers": list(servers),
        "written": written,
    }
    try:
        change["symlink"] = os.readlink(resolv_conf)
    except OSError:
        change["symlink"] = None
        try:
            change["content"] = resolv_conf.read_text()
        except FileNotFoundError:
            change["content"] = None
        except OSError as exc:
            raise ResolverError(f"cannot read {resolv_conf}: {exc.strerror}") from None
    return change


def restore(change: Change) -> None:
    if change["kind"] == "resolvectl":
        _resolvectl("revert", change["link"], missing_ok=True)
        return
    path = Path(change["path"])
    written = change.get("written")
    try:
        current = path.read_text() if not path.is_symlink() else None
    except FileNotFoundError:
        current = None
    if current != written:
        # Not written yet (a run killed just before), or rewritten by someone else since.
        if current != change.get("content"):
            log.warning("%s was changed by something else meanwhile: left as it is", path)
        return
    if change.get("symlink") is not None:
        tmp = path.with_name(path.name + ".tun2socks")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(change["symlink"], tmp)
        os.replace(tmp, path)
    elif change.get("content") is None:
        path.unlink()
    else:
        with open(path, "w") as f:
            f.write(change["content"])


def _resolvectl(*args: str, missing_ok: bool = False) -> None:
    try:
        proc = subprocess.run(
            ["resolvectl", *args],
            capture_output=True,
            text=True,
            timeout=RESOLVECTL_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ResolverError(f"resolvectl {args[0]}: {exc}") from None
    if proc.returncode != 0:
        message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        if missing_ok and "not found" in message.lower():
            return  # the link is gone with the device: nothing to revert
        raise ResolverError(f"resolvectl {' '.join(args)}: {message or proc.returncode}")
