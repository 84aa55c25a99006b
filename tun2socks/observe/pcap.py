"""Packet capture: every packet read from or written to the TUN, in the classic pcap format.

The device's tap hands each packet to `Capture`, which writes a 16-byte record header and the
packet. The link type is LINKTYPE_RAW (101): the records are bare IPv4 or IPv6 packets, as
the TUN carries them, so Wireshark and tshark read the file as it is. With offloads on, the
packets are the device's super-segments (up to 64 KiB) and their TCP/UDP checksums may be
partial; tshark does not verify checksums by default.

A capture goes to a file (`api.pcap.file`, `run --pcap FILE`: from the start) or, when the
API starts one and no file is configured, to memory (fetched with GET /pcap/download); the
API never takes a path from a client, since the program runs as root. Either way it stops by
itself before it would exceed `max_bytes`.
"""

from __future__ import annotations

import io
import logging
import struct
import time
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from tun2socks.device import TunDevice

log = logging.getLogger(__name__)

PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps
PCAP_VERSION = (2, 4)
LINKTYPE_RAW = 101  # https://www.tcpdump.org/linktypes.html: raw IPv4/IPv6
SNAPLEN = 262144  # Wireshark's default; above any 64 KiB super-segment, so nothing is cut
GLOBAL_HEADER = struct.Struct("<IHHiIII")
RECORD_HEADER = struct.Struct("<IIII")  # seconds, microseconds, captured length, original length
FILE_BUFFER = 1 << 20


def global_header() -> bytes:
    return GLOBAL_HEADER.pack(PCAP_MAGIC, *PCAP_VERSION, 0, 0, SNAPLEN, LINKTYPE_RAW)


class PcapWriter:
    """pcap records into a binary stream until the next one would pass `max_bytes`."""

    def __init__(self, stream: BinaryIO, max_bytes: int) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self.packets = 0
        self.full = False
        header = global_header()
        stream.write(header)
        self.bytes_written = len(header)

    def write(self, packet: bytes, timestamp_us: int) -> bool:
        """Append one packet; False (and nothing written) once the limit is reached."""
        if self.full:
            return False
        captured = packet[:SNAPLEN]
        size = RECORD_HEADER.size + len(captured)
        if self.bytes_written + size > self.max_bytes:
            self.full = True
            return False
        seconds, micros = divmod(timestamp_us, 1_000_000)
        self.stream.write(RECORD_HEADER.pack(seconds, micros, len(captured), len(packet)))
        self.stream.write(captured)
        self.bytes_written += size
        self.packets += 1
        return True


class Capture:
    """Starts and stops the capture of one device's packets (see the module docstring)."""

    def __init__(self, device: TunDevice, *, file: str | None, max_bytes: int) -> None:
        self.device = device
        self.file = file
        self.max_bytes = max_bytes
        self._writer: PcapWriter | None = None
        self._memory: io.BytesIO | None = None  # the last in-memory capture, kept for download
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def start(self, max_bytes: int | None = None) -> None:
        """Start a new capture (the previous one is replaced). Raises OSError for the file."""
        self.stop()
        limit = max_bytes if max_bytes is not None else self.max_bytes
        if self.file is not None:
            stream: BinaryIO = open(self.file, "wb", buffering=FILE_BUFFER)  # noqa: SIM115
            self._memory = None
        else:
            stream = self._memory = io.BytesIO()
        self._writer = PcapWriter(stream, limit)
        self._running = True
        self.device.tap = self._tap
        log.info("packet capture started: %s, at most %d bytes", self.where, limit)

    def stop(self) -> None:
        """Stop capturing; a file is flushed and closed, memory is kept for download."""
        if not self._running:
            return
        self._running = False
        if self.device.tap == self._tap:
            self.device.tap = None
        writer = self._writer
        assert writer is not None
        if self.file is not None:
            writer.stream.close()
        log.info(
            "packet capture stopped: %d packets, %d bytes", writer.packets, writer.bytes_written
        )

    def _tap(self, packet: bytes, outgoing: bool) -> None:
        writer = self._writer
        if writer is not None and not writer.write(packet, time.time_ns() // 1000):
            log.warning("packet capture reached its limit of %d bytes", writer.max_bytes)
            self.stop()

    @property
    def where(self) -> str:
        return self.file if self.file is not None else "memory"

    def contents(self) -> bytes | None:
        """The in-memory capture (None when captures go to a file, or none was taken)."""
        if self.file is not None or self._memory is None:
            return None
        return self._memory.getvalue()

    def flush(self) -> None:
        if self._running and self._writer is not None:
            self._writer.stream.flush()

    def status(self) -> dict[str, object]:
        writer = self._writer
        return {
            "running": self._running,
            "target": self.where,
            "packets": writer.packets if writer else 0,
            "bytes": writer.bytes_written if writer else 0,
            "max_bytes": writer.max_bytes if writer else self.max_bytes,
            "full": writer.full if writer else False,
        }
