"""TUN writes on a thread of their own, so that the kernel's work for them uses another core.

Writing a packet to a TUN is not a copy into a queue: the kernel delivers it in the write call
itself (through the receiving socket's TCP, to the client's queue), and for a 64 KiB
super-packet that is cut into segments this is most of the cost of a download. On the event
loop's thread that work and our Python work take turns on one core; here the thread makes the
calls while the loop goes on (os.write and os.writev release the GIL during the system call).

One thread, one FIFO queue: packets leave in the order they were submitted, so the order of
each flow (and of all flows) is kept. The queue is bounded in packets and bytes like the
device's own (a full queue drops, as a full TUN queue would: TCP retransmits). `stop` lets the
thread write what is queued (the RSTs of a shutdown) and ends it.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

# A packet that meets EAGAIN waits for the fd in steps of this long, checking for `stop`.
POLL_STEP_MS = 100

# Writes one packet; False if the fd would block (the packet is not written).
WriteOne = Callable[[bytes], bool]


class TunWriter:
    """A thread that writes the packets handed to `submit`, in order, with `write_one`."""

    def __init__(
        self, fd: int, write_one: WriteOne, *, max_packets: int, max_bytes: int, name: str
    ) -> None:
        self._fd = fd
        self._write_one = write_one
        self._max_packets = max_packets
        self._max_bytes = max_bytes
        self._queue: deque[bytes] = deque()
        self._queued_packets = 0  # in the queue or being written now
        self._queued_bytes = 0
        self._busy = False  # the thread holds packets taken from the queue
        self._stopping = False
        self._stop_deadline: float | None = None
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self.drops = 0  # packets left unwritten by a stop whose deadline passed
        self._thread = threading.Thread(target=self._run, name=f"{name}-writer", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        """Nothing queued or being written: a write made elsewhere now keeps the order."""
        with self._lock:
            return not self._busy and not self._queue

    @property
    def queued_packets(self) -> int:
        return self._queued_packets

    def submit(self, packets: Iterable[bytes]) -> list[bytes]:
        """Queue `packets` for writing; the ones taken (the rest were dropped: queue full)."""
        taken: list[bytes] = []
        with self._lock:
            if self._stopping:
                return taken
            for packet in packets:
                size = len(packet)
                if (
                    self._queued_packets >= self._max_packets
                    or self._queued_bytes + size > self._max_bytes
                ):
                    continue
                self._queue.append(packet)
                self._queued_packets += 1
                self._queued_bytes += size
                taken.append(packet)
            if taken:
                self._wakeup.notify()
        return taken

    def stop(self, timeout: float) -> bool:
        """Write what is queued (for at most `timeout` seconds) and end the thread; whether it
        ended. Idempotent."""
        with self._lock:
            self._stopping = True
            self._stop_deadline = time.monotonic() + timeout
            self._wakeup.notify()
        self._thread.join(timeout + POLL_STEP_MS / 1000 + 0.5)
        return not self._thread.is_alive()

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        queue_wait = self._wakeup.wait
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    queue_wait()
                if not self._queue:  # stopping, everything written
                    self._busy = False
                    return
                self._busy = True
                batch, self._queue = self._queue, deque()
            written_bytes = 0
            for count, packet in enumerate(batch):
                if not self._write_blocking(packet):  # stopped while the fd stayed full
                    with self._lock:
                        self.drops += len(batch) - count + len(self._queue)
                        self._queue.clear()
                        self._queued_packets = self._queued_bytes = 0
                        self._busy = False
                    return
                written_bytes += len(packet)
            with self._lock:
                self._queued_packets -= len(batch)
                self._queued_bytes -= written_bytes
                if not self._queue:
                    self._busy = False

    def _write_blocking(self, packet: bytes) -> bool:
        """Write `packet`, waiting while the fd is full; False if a stop's deadline passed."""
        while not self._write_one(packet):
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            poller.poll(POLL_STEP_MS)
            deadline = self._stop_deadline
            if deadline is not None and time.monotonic() > deadline:
                log.debug("TUN writer: fd still full at the stop deadline")
                return False
        return True
