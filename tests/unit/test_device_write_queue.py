"""The device's write queues when the fd says EAGAIN: nothing lost, order kept, memory bounded.

The same with the writer thread (tun_writer.py), and at close: what it holds is written and
no thread is left.

A real TUN write fails with EAGAIN only in a narrow case (test_robustness.py provokes it with
a second writer and a tiny TUNSETSNDBUF), so here a non-blocking Unix datagram socket stands
in for the TUN fd: it keeps packet boundaries like a TUN and blocks as soon as its peer's
queue is full. No root, no sleeps: the loop runs until the peer has read everything.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from tun2socks.device import INLINE_WRITE_BYTES, MAX_QUEUED_PACKETS, TunDevice

N_PACKETS = 3000


class FdStandIn:
    """What TunDevice needs of a pytun device: a name, the fd, close()."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.name = "standin0"

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (ours, theirs):
        sock.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    yield ours, theirs
    theirs.close()
    ours.close()


def packet(i: int) -> bytes:
    return struct.pack("!I", i) + bytes(1000)


def read_ready(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def test_writes_meeting_eagain_are_queued_and_all_arrive_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    loop = asyncio.new_event_loop()
    device = TunDevice(FdStandIn(ours), mtu=1500, offload=False, created=False)
    try:
        device.start(loop, lambda batch: None)
        sent = [packet(i) for i in range(N_PACKETS)]
        device.write(sent[: N_PACKETS // 2])
        device.write(sent[N_PACKETS // 2 :])
        received = read_ready(theirs)
        assert len(received) < N_PACKETS  # the fd did block: the rest waits in the queue
        done = loop.create_future()

        def drain() -> None:
            received.extend(read_ready(theirs))
            if len(received) >= N_PACKETS and not done.done():
                done.set_result(None)

        loop.add_reader(theirs.fileno(), drain)
        loop.run_until_complete(asyncio.wait_for(done, 10))
        loop.remove_reader(theirs.fileno())
        assert received == sent
        assert device.stats.write_queue_drops == 0
        assert device.stats.packets_out == N_PACKETS
    finally:
        device.close()
        loop.close()


def test_queue_is_bounded_while_the_fd_stays_blocked(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = pair
    loop = asyncio.new_event_loop()
    device = TunDevice(FdStandIn(ours), mtu=1500, offload=False, created=False)
    try:
        device.start(loop, lambda batch: None)
        total = MAX_QUEUED_PACKETS + 2 * N_PACKETS
        device.write(packet(i) for i in range(total))
        written = device.stats.packets_out
        assert written < N_PACKETS
        assert device.stats.write_queue_drops == total - written - MAX_QUEUED_PACKETS
    finally:
        device.close()
        loop.close()


# ---------------------------------------------------------------- with the writer thread


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith("-writer")]


def read_until(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    """Read `count` datagrams from `sock` (blocking, bounded by `timeout`)."""
    out: list[bytes] = []
    sock.settimeout(timeout)
    try:
        while len(out) < count:
            out.append(sock.recv(4096))
    finally:
        sock.setblocking(False)
    return out


def test_writer_thread_keeps_the_order_of_large_and_small_writes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    loop = asyncio.new_event_loop()
    device = TunDevice(FdStandIn(ours), mtu=1500, offload=False, created=False, write_thread=True)
    try:
        device.start(loop, lambda batch: None)
        sent = [packet(i) for i in range(N_PACKETS)]
        # Batches over INLINE_WRITE_BYTES go to the thread; single small packets in between
        # may be written here only while it is idle: the peer sees one order either way.
        i = 0
        while i < N_PACKETS:
            step = 1 if i % 3 else 40
            device.write(sent[i : i + step])
            i += step
        assert sum(len(p) for p in sent[:40]) > INLINE_WRITE_BYTES
        received = read_until(theirs, N_PACKETS)
        assert received == sent
        device.drain()
        assert device.stats.packets_out == N_PACKETS
        assert device.stats.write_queue_drops == 0
        assert writer_threads() == []
    finally:
        device.close()
        loop.close()


def test_close_writes_what_the_thread_holds_and_ends_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    loop = asyncio.new_event_loop()
    device = TunDevice(FdStandIn(ours), mtu=1500, offload=False, created=False, write_thread=True)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.extend(read_until(theirs, 500)))
    try:
        device.start(loop, lambda batch: None)
        sent = [packet(i) for i in range(500)]
        device.write(sent)  # the thread's; the slow peer (4 KB of buffer) keeps it busy
        reader.start()
        device.close()  # as at shutdown, after the final RSTs: returns when all are written
        assert writer_threads() == []
        assert device.stats.packets_out == 500
        reader.join(10)
        assert received == sent
    finally:
        device.close()
        loop.close()


def test_writer_thread_queue_is_bounded_and_a_stop_does_not_hang_on_a_full_fd(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = pair  # nobody reads: the fd stays full
    loop = asyncio.new_event_loop()
    device = TunDevice(FdStandIn(ours), mtu=1500, offload=False, created=False, write_thread=True)
    try:
        device.start(loop, lambda batch: None)
        total = MAX_QUEUED_PACKETS + 2 * N_PACKETS
        device.write([packet(i) for i in range(total)])
        # Taken: at most MAX_QUEUED_PACKETS (queued, or written by the thread meanwhile).
        assert device.stats.write_queue_drops == total - MAX_QUEUED_PACKETS
        device.drain(timeout=0.3)  # the fd never drains: the rest is given up, not waited for
        assert writer_threads() == []
        stats = device.stats
        assert stats.packets_out + stats.write_queue_drops == total
        assert stats.packets_out < N_PACKETS
    finally:
        device.close()
        loop.close()
