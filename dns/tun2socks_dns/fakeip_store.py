"""Fake-IP mappings kept over a restart: one file in ``route.state_dir``, per device.

An application that resolved ``example.com`` to a fake address before tun2socks restarted
still holds that address (its own cache, an open retry loop); without the old mapping the new
run could only refuse its connections. The store reloads the pools at start and writes them
back when new mappings were made, at most every ``SAVE_INTERVAL_S`` (batched: a burst of
queries costs one write), and once more on stop. A SIGKILL loses at most the last interval.

Each write goes to a temporary file that then replaces the old one (rename is atomic), so a
crash mid-write leaves the previous file whole. The file lists the names a user visited: it is
created readable by its owner only. Each pool keeps at most ``MAX_MAPPINGS`` (the most
recently used), which bounds the file. A file that cannot be read or written costs a warning,
never the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tun2socks.host.state import state_name

from .fakeip import FakeIpPool

log = logging.getLogger("tun2socks.dns")

SAVE_INTERVAL_S = 2.0
MAX_MAPPINGS = 65536  # per pool; about 40 bytes each in the file
FORMAT_VERSION = 1


def store_path(state_dir: str | Path, device: str) -> Path:
    """Beside the device's state record, under a suffix `tun2socks down` does not take for one."""
    return Path(state_dir) / f"{state_name(device)}.fakeip"


class FakeIpStore:
    def __init__(
        self,
        path: Path,
        pools: Sequence[FakeIpPool],
        clock: Callable[[], float],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.pools = list(pools)
        self._clock = clock  # the pools' time (the loop's monotonic clock)
        self._wall_clock = wall_clock  # across runs: how long the file has been lying there
        self._saved_changes = self._changes()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def _changes(self) -> int:
        return sum(pool.changes for pool in self.pools)

    def load(self) -> int:
        """Restore the pools from the file; how many mappings came back."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("fake-IP mappings not restored: cannot read %s: %s", self.path, exc)
            return 0
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            log.warning("fake-IP mappings not restored: %s is not a mapping file", self.path)
            return 0
        saved_at = data.get("saved_at")
        elapsed = self._wall_clock() - saved_at if isinstance(saved_at, int | float) else 0.0
        now = self._clock()
        pools = data.get("pools")
        restored = 0
        for pool in self.pools:
            for snapshot in pools if isinstance(pools, list) else []:
                restored += pool.restore(snapshot, now, max(0.0, elapsed))
        self._saved_changes = self._changes()
        if restored:
            log.info("restored %d fake-IP mappings from %s", restored, self.path)
        return restored

    def save(self) -> None:
        """Write the pools now (temporary file, then rename)."""
        now = self._clock()
        data = {
            "version": FORMAT_VERSION,
            "saved_at": self._wall_clock(),
            "pools": [pool.snapshot(now, MAX_MAPPINGS) for pool in self.pools],
        }
        changes = self._changes()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError as exc:
            if not self._failing:  # one line per failing stretch, not one per interval
                log.warning("fake-IP mappings not saved to %s: %s", self.path, exc.strerror)
            self._failing = True
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self._failing = False
        self._saved_changes = changes

    def start(self) -> None:
        """Save in the background whenever new mappings were made (call in the loop)."""
        self._task = asyncio.get_running_loop().create_task(self._save_changes())

    async def _save_changes(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL_S)
            if self._changes() != self._saved_changes:
                self.save()

    async def close(self) -> None:
        """Stop the background saves; write once more."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.save()
