"""The TUN device: open/attach, configure, and move IP packets between the fd and the stack.

The only module that touches /dev/net/tun. In offload mode every read and write carries a
10-byte virtio_net_hdr (its codec: net/vnet.py). Reads may be TCP super-packets of up to 64 KiB
whose checksum is only partial (NEEDS_CSUM: the stack must not verify them). Writes leave the
checksum (NEEDS_CSUM with the pseudo-header sum in the checksum field) and the segmentation (GSO
for TCP bigger than the MTU) to the kernel. Measurements: notes/tun-offload.md. The link's MTU,
addresses and state are set over netlink by host/link.py.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any

import pytun

from tun2socks.errors import UserError
from tun2socks.host.link import LinkError, configure_link, link_exists
from tun2socks.net.vnet import CHECKSUM_TRUSTED, VNET_HDR_LEN, vnet_header_for
from tun2socks.tun_writer import TunWriter

log = logging.getLogger(__name__)

# linux/if_tun.h (x86_64 ioctl numbers: _IOW('T', n, int) = 0x400454nn, _IOR = 0x800454nn)
TUNSETOFFLOAD = 0x400454D0  # argument is the int itself, not a pointer
TUNGETIFF = 0x800454D2  # fills a struct ifreq; flags at offset 16
SIOCGIFMTU = 0x8921  # linux/sockios.h
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01  # we accept packets with partial checksums
TUN_F_TSO4 = 0x02  # ... and TCP super-packets (requires TUN_F_CSUM)
TUN_F_TSO6 = 0x04
# Reads per wake-up grow with the time since the last one: `batch` packets per
# BATCH_INTERVAL away, at most MAX_BATCH. A quiet loop reads small batches (each reply
# waits for its batch); when thousands of upstream sockets make each loop turn long (10,000
# connections opened at once) a fixed 64 per turn starved the TUN, and its kernel queue
# overflowed into minutes of client retransmissions.
BATCH_INTERVAL = 0.005  # seconds
MAX_BATCH = 4096

IFNAMSIZ = 16
# A super-packet is at most 64 KiB; the slack lets us detect (and drop) anything bigger instead of
# silently truncating it. Kept under glibc's 128 KiB mmap threshold so each read stays cheap.
READ_SIZE = 65536 + VNET_HDR_LEN + 1014
MAX_QUEUED_PACKETS = 4096
MAX_QUEUED_BYTES = 64 * 1024 * 1024
# With the writer thread, writes up to this size in all are made on the loop's thread while the
# thread is idle: a SYN-ACK, an ACK or a short answer does not wait for a thread's wake-up, and
# a burst of small packets (SYN-ACKs to thousands of new flows) costs no GIL hand-off per
# packet. The thread pays for itself on bulk data: 64 KiB super-packets.
INLINE_WRITE_BYTES = 32 * 1024
# How long shutting down waits for the writer thread to write what it holds (the final RSTs).
WRITER_STOP_TIMEOUT = 2.0

OnPackets = Callable[[list[tuple[bytes, bool]]], None]
# Sees every packet read (False) and written (True), e.g. the packet capture.
PacketTap = Callable[[bytes, bool], None]


class DeviceError(UserError):
    """The TUN device cannot be opened or configured; str() is one line for the user."""


@dataclass
class DeviceStats:
    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    write_queue_drops: int = 0
    packets_to_writer: int = 0  # handed to the writer thread (tun.write_thread)
    read_errors: int = 0
    write_errors: int = 0


class TunDevice:
    """An open TUN fd in non-blocking mode; `start` hands batches of packets to a callback.

    With `write_thread`, packets are written by a thread of their own (tun_writer.py) from
    `start` until `drain` or `close`, except small writes while it is idle.
    """

    def __init__(
        self, tun: Any, *, mtu: int, offload: bool, created: bool, write_thread: bool = False
    ) -> None:
        self._tun = tun
        self._fd: int = tun.fileno()
        self.name: str = tun.name
        self.mtu = mtu
        self.offload = offload
        self.created = created
        self.stats = DeviceStats()
        self.tap: PacketTap | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_packets: OnPackets | None = None
        self._batch = 64
        self._last_read = 0.0
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._closed = False
        self._write_thread = write_thread
        self._writer: TunWriter | None = None

    @classmethod
    def open(
        cls,
        name: str,
        *,
        mtu: int,
        addresses: Sequence[IPv4Interface | IPv6Interface],
        offload: bool,
        txqueuelen: int | None = None,
        write_thread: bool = False,
    ) -> TunDevice:
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise DeviceError(f"invalid device name {name!r} (1 to {IFNAMSIZ - 1} characters)")
        created = not link_exists(name)
        tun = _open_with_offload(name) if offload else None
        effective_offload = tun is not None
        if tun is None:
            try:
                tun = _tunsetiff(name, IFF_TUN | IFF_NO_PI)
            except OSError as exc:
                raise DeviceError(_open_error(name, exc)) from None
        try:
            configure_link(name, mtu, addresses, txqueuelen)
        except LinkError as exc:
            tun.close()
            raise DeviceError(str(exc)) from None
        except BaseException:
            tun.close()
            raise
        how = "created" if created else "attached"
        log.info("TUN %s %s, mtu %d, offload %s", name, how, mtu, effective_offload)
        return cls(
            tun, mtu=mtu, offload=effective_offload, created=created, write_thread=write_thread
        )

    @classmethod
    def from_fd(cls, fd: int, *, mtu: int, offload: bool, write_thread: bool = False) -> TunDevice:
        """A TUN that a parent process opened and handed over as descriptor `fd`.

        Needs no privilege: the parent has configured the device (addresses, MTU, link up);
        nothing is changed here but the offload flags of the descriptor. The header mode is the
        parent's choice: with IFF_VNET_HDR every packet carries the header and offload is used.
        """
        try:
            ifreq = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
        except OSError as exc:
            raise DeviceError(f"fd://{fd} is not an open TUN device: {exc.strerror}") from None
        name = ifreq[:IFNAMSIZ].split(b"\0", 1)[0].decode(errors="replace")
        (flags,) = struct.unpack_from("H", ifreq, IFNAMSIZ)
        if flags & (IFF_TUN | IFF_NO_PI) != IFF_TUN | IFF_NO_PI:
            raise DeviceError(f"fd://{fd} ({name}): must be opened with IFF_TUN | IFF_NO_PI")
        vnet = bool(flags & IFF_VNET_HDR)
        if vnet:
            wanted = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if offload else 0
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, wanted)
            except OSError as exc:
                log.warning("TUN %s: offload refused (%s)", name, exc.strerror or exc)
        elif offload:
            log.info("TUN %s: opened without IFF_VNET_HDR by the parent: no offload", name)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                ifreq = fcntl.ioctl(probe, SIOCGIFMTU, struct.pack("16si", name.encode(), 0))
            mtu = struct.unpack_from("i", ifreq, IFNAMSIZ)[0]
        except OSError:
            log.info("TUN %s: its MTU is not visible here; using %d", name, mtu)
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        log.info("TUN %s from fd %d, mtu %d, vnet header %s", name, fd, mtu, vnet)
        return cls(
            _Descriptor(fd, name), mtu=mtu, offload=vnet, created=False, write_thread=write_thread
        )

    def fileno(self) -> int:
        return self._fd

    def start(
        self, loop: asyncio.AbstractEventLoop, on_packets: OnPackets, *, batch: int = 64
    ) -> None:
        if self._closed or self._loop is not None:
            raise RuntimeError("TunDevice.start() called twice or after close()")
        self._loop, self._on_packets, self._batch = loop, on_packets, batch
        self._last_read = loop.time()
        loop.add_reader(self._fd, self._on_readable)
        if self._write_thread:
            self._writer = TunWriter(
                self._fd,
                self._write_raw,
                max_packets=MAX_QUEUED_PACKETS,
                max_bytes=MAX_QUEUED_BYTES,
                name=self.name,
            )

    def _on_readable(self) -> None:
        fd, offload, read = self._fd, self.offload, os.read
        packets: list[tuple[bytes, bool]] = []
        nbytes = 0
        assert self._loop is not None
        now = self._loop.time()
        away, self._last_read = now - self._last_read, now
        batch = min(MAX_BATCH, max(self._batch, int(self._batch * away / BATCH_INTERVAL)))
        for _ in range(batch):
            try:
                data = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._read_failed(exc)
                break
            if len(data) >= READ_SIZE or (offload and len(data) <= VNET_HDR_LEN):
                self.stats.read_errors += 1  # truncated or headless: never pass it on
                continue
            if offload:
                packets.append((data[VNET_HDR_LEN:], bool(data[0] & CHECKSUM_TRUSTED)))
                nbytes += len(data) - VNET_HDR_LEN
            else:
                packets.append((data, False))
                nbytes += len(data)
        if packets:
            self.stats.packets_in += len(packets)
            self.stats.bytes_in += nbytes
            if (tap := self.tap) is not None:
                for packet, _trusted in packets:
                    tap(packet, False)
            assert self._on_packets is not None
            self._on_packets(packets)

    def _read_failed(self, exc: OSError) -> None:
        self.stats.read_errors += 1
        if exc.errno in (errno.EBADFD, errno.EBADF):
            # The device was deleted under us: the fd stays readable forever, so stop polling it.
            log.error("TUN %s: read failed (%s); no longer reading", self.name, exc.strerror)
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
        else:
            log.debug("TUN %s: read failed: %s", self.name, exc)

    def write(self, packets: Iterable[bytes]) -> None:
        """Send IP packets to the kernel; what cannot be written now is queued (bounded).

        With the writer thread, it writes them unless they are small and it is idle. The order
        is kept: the thread gets nothing while this thread's EAGAIN queue holds packets, and this
        thread writes nothing while the thread holds some."""
        if self._closed:
            return
        writer = self._writer
        if writer is not None and not self._queue:
            if not isinstance(packets, list):
                packets = list(packets)
            if not writer.idle or sum(map(len, packets)) > INLINE_WRITE_BYTES:
                taken = writer.submit(packets)
                self.stats.packets_to_writer += len(taken)
                self.stats.write_queue_drops += len(packets) - len(taken)
                if (tap := self.tap) is not None:  # here, on the loop's thread, when queued
                    for packet in taken:
                        tap(packet, True)
                return
        it = iter(packets)
        if not self._queue:
            for packet in it:
                if not self._write_one(packet):
                    self._enqueue(packet)
                    break
        for packet in it:
            self._enqueue(packet)

    def _write_one(self, packet: bytes) -> bool:
        """False when the fd would block (the packet is not written)."""
        if not self._write_raw(packet):
            return False
        if (tap := self.tap) is not None:
            tap(packet, True)
        return True

    def _write_raw(self, packet: bytes) -> bool:
        """The write itself and its counters (also on the writer thread); False on EAGAIN."""
        try:
            if self.offload:
                os.writev(self._fd, (vnet_header_for(packet, self.mtu), packet))
            else:
                os.write(self._fd, packet)
        except BlockingIOError:
            return False
        except OSError as exc:
            # EIO while the link is down, EINVAL for a packet the kernel rejects: drop that one.
            self.stats.write_errors += 1
            log.debug("TUN %s: write of %d bytes failed: %s", self.name, len(packet), exc)
            return True
        self.stats.packets_out += 1
        self.stats.bytes_out += len(packet)
        return True

    def _enqueue(self, packet: bytes) -> None:
        if len(self._queue) >= MAX_QUEUED_PACKETS or (
            self._queued_bytes + len(packet) > MAX_QUEUED_BYTES
        ):
            self.stats.write_queue_drops += 1
            return
        if not self._queue:
            if self._loop is None:
                raise RuntimeError("TunDevice.write() would block before start()")
            self._loop.add_writer(self._fd, self._on_writable)
        self._queue.append(packet)
        self._queued_bytes += len(packet)

    def _on_writable(self) -> None:
        queue = self._queue
        while queue:
            if not self._write_one(queue[0]):
                return
            self._queued_bytes -= len(queue.popleft())
        assert self._loop is not None
        self._loop.remove_writer(self._fd)

    def drain(self, timeout: float = WRITER_STOP_TIMEOUT) -> None:
        """Let the writer thread write what it holds (for at most `timeout` seconds) and end it;
        later writes are made on the caller's thread. Shutting down calls it after the RSTs."""
        writer, self._writer = self._writer, None
        if writer is not None:
            if not writer.stop(timeout):
                log.warning("TUN %s: the writer thread did not end", self.name)
            self.stats.write_queue_drops += writer.drops

    def close(self) -> None:
        if self._closed:
            return
        self.drain()
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._queue.clear()
        self._queued_bytes = 0
        self._tun.close()

    def __repr__(self) -> str:
        return f"TunDevice(name={self.name!r}, mtu={self.mtu}, offload={self.offload})"


class _Descriptor:
    """A TUN descriptor we did not open ourselves, shaped like a pytun device."""

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        os.close(self._fd)


def _tunsetiff(name: str, flags: int) -> Any:
    """Create or attach to TUN `name` (pytun does TUNSETIFF), non-blocking and close-on-exec.

    Raises OSError (pytun.Error is one, with errno set)."""
    tun = pytun.TunTapDevice(name=name, flags=flags)
    os.set_blocking(tun.fileno(), False)
    os.set_inheritable(tun.fileno(), False)
    return tun


def _open_error(name: str, exc: OSError) -> str:
    code = exc.errno
    if code in (errno.EPERM, errno.EACCES):
        return f"cannot open TUN device {name}: need root or CAP_NET_ADMIN"
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return f"cannot open TUN device {name}: /dev/net/tun is missing (is the tun module loaded?)"
    if code == errno.EBUSY:
        return f"cannot open TUN device {name}: device in use by another process"
    if code == errno.EINVAL:
        return f"cannot attach to {name}: it exists but is not a single-queue TUN device"
    return f"cannot open TUN device {name}: {exc.strerror or exc}"


def _open_with_offload(name: str) -> Any:
    """The device with IFF_VNET_HDR and checksum/TSO offloads, or None if the kernel refused."""
    try:
        tun = _tunsetiff(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise DeviceError(_open_error(name, exc)) from None
        log.warning("TUN %s: IFF_VNET_HDR refused; offload disabled", name)
        return None
    try:
        ifreq = fcntl.ioctl(tun.fileno(), TUNGETIFF, bytes(40))
        (flags,) = struct.unpack_from("H", ifreq, IFNAMSIZ)
        # TUNSETOFFLOAD without the vnet header would hand us partial checksums with no metadata.
        if not flags & IFF_VNET_HDR:
            raise OSError(errno.EOPNOTSUPP, "IFF_VNET_HDR not in effect")
        fcntl.ioctl(tun.fileno(), TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError as exc:
        log.warning("TUN %s: offload refused (%s); using plain mode", name, exc.strerror or exc)
        tun.close()
        return None
    return tun
