"""What tun2socks changed on the host, recorded so that it can always be undone; one run per device.

Theory of operation
-------------------
Each run locks ``STATE_DIR/NAME.lock`` (``flock``, held until exit; the file holds the pid) and
keeps ``STATE_DIR/NAME.json``: the device, the pid and the list of changes. A change is recorded
*before* it is made (write-ahead, the file replaced by rename each time), so a run killed at any
point leaves a record that covers everything it did; undoing a change that never happened is
harmless (the route or rule is simply not there). A clean exit undoes the changes and deletes
both files; after a SIGKILL, ``tun2socks down`` or the next start on the same device undoes
them from the record.

NAME is the device name in the host's network namespace (that of pid 1) and
``DEVICE@netns-INODE`` in any other, so that runs in different namespaces never share a record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from tun2socks.errors import UserError

STATE_VERSION = 1
LOCK_ATTEMPTS = 5

Change = dict[str, Any]  # {"kind": "...", ...}: JSON, see tun2socks.host.routes for the kinds


class StateError(UserError):
    """The record or the lock cannot be used; str() is one line for the user."""


class AlreadyRunning(StateError):
    pass


def netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def state_name(device: str) -> str:
    own = netns_inode()
    try:
        host = os.stat("/proc/1/ns/net").st_ino
    except OSError:  # not allowed to look: name it by the namespace to be safe
        host = -1
    return device if own == host else f"{device}@netns-{own}"


class StateFile:
    """The lock and the change record of one device."""

    def __init__(self, state_dir: str | Path, device: str) -> None:
        self.dir = Path(state_dir)
        self.device = device
        name = state_name(device)
        self.path = self.dir / f"{name}.json"
        self.lock_path = self.dir / f"{name}.lock"
        self.changes: list[Change] = []
        self._lock_fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def lock(self) -> None:
        """Take the device's lock; AlreadyRunning names the pid holding it."""
        try:
            self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.dir}: {exc.strerror}") from None
        for _ in range(LOCK_ATTEMPTS):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StateError(f"cannot open {self.lock_path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise AlreadyRunning(
                    f"tun2socks is already running on device {self.device} (pid {pid}); "
                    "stop it first"
                ) from None
            # The holder before us unlinks the file on exit: if it did so between our open and
            # our flock, we hold a lock on a file nobody else can find. Try again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._lock_fd = fd
                return
            os.close(fd)
        raise StateError(f"cannot lock {self.lock_path}: it keeps changing")

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            self.lock_path.unlink()  # still holding the lock: see lock()
        os.close(self._lock_fd)
        self._lock_fd = None

    def holder(self) -> int | None:
        """The pid written in the lock file, if any (for messages)."""
        try:
            text = self.lock_path.read_text()
        except OSError:
            return None
        return int(text) if text.strip().isdigit() else None

    def leftover(self) -> dict[str, Any] | None:
        """The record a killed run left behind (call with the lock held), or None."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read {self.path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("changes"), list):
            raise StateError(f"{self.path}: not a tun2socks state file")
        return data

    def record(self, change: Change) -> None:
        """Add a change to the record, on disk, before it is made."""
        self.changes.append(change)
        self._save()

    def adopt(self, changes: list[Change]) -> None:
        """Take over changes of a killed run that stay in place (route.strict's block)."""
        self.changes = list(changes)
        self._save()

    def forget(self, change: Change) -> None:
        """Drop a change that turned out not to be ours (it existed before)."""
        self.changes.remove(change)
        self._save()

    def _save(self) -> None:
        data = {
            "version": STATE_VERSION,
            "device": self.device,
            "pid": os.getpid(),
            "netns": netns_inode(),
            "changes": self.changes,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror}") from None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def devices_with_state(state_dir: str | Path) -> list[str]:
    """The devices that have a record of this network namespace in `state_dir`."""
    suffix = state_name("")  # "" in the host namespace, "@netns-INODE" in another
    devices = []
    for path in sorted(Path(state_dir).glob("*.json")):
        stem = path.stem
        if suffix and stem.endswith(suffix) and len(stem) > len(suffix):
            devices.append(stem.removesuffix(suffix))
        elif not suffix and "@netns-" not in stem:
            devices.append(stem)
    return devices
