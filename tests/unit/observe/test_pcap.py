"""The pcap writer and the capture switch: files read back by scapy (an independent reader),
the size limit, and the device tap that feeds them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.utils import PcapReader

from tun2socks.observe.pcap import LINKTYPE_RAW, RECORD_HEADER, Capture, PcapWriter, global_header

V4 = bytes(IP(src="198.18.254.1", dst="198.19.0.10") / TCP(sport=40000, dport=80, flags="S"))
V6 = bytes(IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=40000, dport=80, flags="SA"))


class Device:
    """Only the attribute a capture uses: the tap the TUN device calls for each packet."""

    tap = None


def read_back(data: bytes) -> list[bytes]:
    with PcapReader(io.BytesIO(data)) as reader:
        assert reader.linktype == LINKTYPE_RAW
        return [bytes(packet) for packet in reader]


def test_packets_read_back_as_ipv4_and_ipv6() -> None:
    stream = io.BytesIO()
    writer = PcapWriter(stream, max_bytes=1 << 20)
    assert writer.write(V4, 1_700_000_000_123_456)
    assert writer.write(V6, 1_700_000_001_000_000)
    assert read_back(stream.getvalue()) == [V4, V6]
    assert writer.bytes_written == len(stream.getvalue())
    assert writer.packets == 2


def test_timestamps_are_seconds_and_microseconds() -> None:
    stream = io.BytesIO()
    PcapWriter(stream, max_bytes=4096).write(V4, 1_700_000_000_123_456)
    seconds, micros, captured, original = RECORD_HEADER.unpack_from(
        stream.getvalue(), len(global_header())
    )
    assert (seconds, micros, captured, original) == (1_700_000_000, 123_456, len(V4), len(V4))


def test_super_segment_is_kept_whole() -> None:
    big = bytes(IP(dst="198.19.0.10") / TCP() / (b"x" * 65000))
    stream = io.BytesIO()
    PcapWriter(stream, max_bytes=1 << 20).write(big, 0)
    assert read_back(stream.getvalue()) == [big]


def test_limit_stops_before_it_is_passed() -> None:
    stream = io.BytesIO()
    limit = len(global_header()) + 2 * (RECORD_HEADER.size + len(V4)) + 10
    writer = PcapWriter(stream, max_bytes=limit)
    assert writer.write(V4, 0) and writer.write(V4, 0)
    assert not writer.write(V4, 0)
    assert writer.full and not writer.write(b"\x45", 0)  # stays full, even for a tiny packet
    assert len(stream.getvalue()) <= limit
    assert read_back(stream.getvalue()) == [V4, V4]


def test_capture_to_memory_through_the_tap() -> None:
    device = Device()
    capture = Capture(device, file=None, max_bytes=1 << 20)  # type: ignore[arg-type]
    assert capture.contents() is None
    capture.start()
    assert device.tap is not None
    device.tap(V4, False)
    device.tap(V6, True)
    capture.stop()
    assert device.tap is None
    assert capture.status()["packets"] == 2 and not capture.running
    assert read_back(capture.contents() or b"") == [V4, V6]


def test_capture_to_a_file_restarts_it_and_stops_at_the_limit(tmp_path: Path) -> None:
    device = Device()
    path = tmp_path / "cap.pcap"
    capture = Capture(device, file=str(path), max_bytes=1 << 20)  # type: ignore[arg-type]
    capture.start()
    device.tap(V4, False)
    capture.start(max_bytes=len(global_header()) + RECORD_HEADER.size + len(V6))  # truncates
    device.tap(V6, True)
    device.tap(V6, True)  # does not fit: the capture stops itself
    assert not capture.running and device.tap is None
    status = capture.status()
    assert status["full"] is True and status["packets"] == 1
    assert read_back(path.read_bytes()) == [V6]
    assert capture.contents() is None  # file captures are read from the file


def test_unwritable_file_raises_and_leaves_no_tap(tmp_path: Path) -> None:
    device = Device()
    path = tmp_path / "missing-dir" / "cap.pcap"
    capture = Capture(device, file=str(path), max_bytes=1 << 20)  # type: ignore[arg-type]
    with pytest.raises(OSError):
        capture.start()
    assert device.tap is None and not capture.running
