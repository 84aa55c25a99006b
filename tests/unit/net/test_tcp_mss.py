"""The send MSS of each flow: min(client's MSS, ours) (RFC 9293 3.7.1), clamped from below,
carried into the device's segmentation offload, and lowered by path MTU discovery
(RFC 1191, RFC 8201) when an ICMP error quotes a segment in flight (RFC 5927 4.1)."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest

from tests.support import tcp_helpers
from tests.support.tcp_helpers import Client, established, make_stack, wrap
from tun2socks.net.icmp import IcmpMessage
from tun2socks.net.ip import IpPacket
from tun2socks.net.tcp import TcpSegment
from tun2socks.net.vnet import vnet_header_for

ROUTER = {4: ip_address("198.18.0.254").packed, 6: ip_address("fd00:7f::fe").packed}
DATA = bytes(range(256)) * 200  # 51200 bytes


def _payload_sizes(c: Client) -> list[int]:
    return [len(s.payload) for s in c.output()]


@pytest.fixture
def offload_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helpers parse what the stack sends without verifying offloaded checksums."""

    def parse(data: bytes, version: int = 4) -> tuple[IpPacket, TcpSegment]:
        packet = IpPacket.parse(data)
        segment = TcpSegment.parse(packet, checksum_trusted=True)
        segment.payload = bytes(segment.payload)
        return packet, segment

    monkeypatch.setattr(tcp_helpers, "parse_packet", parse)


def _offloaded_segments(c: Client) -> list[tuple[bytes, TcpSegment]]:
    """Packets with offloaded (partial) checksums, parsed without verifying them."""
    out = []
    for data in c.stack.packets_to_send(c.now):
        out.append((data, TcpSegment.parse(IpPacket.parse(data), checksum_trusted=True)))
    return out


# ---------------------------------------------------------------- effective send MSS


def test_mss_segments_are_cut_at_the_clients_mss() -> None:
    c = established(mss=1200)
    c.stack.send(c.flow_id, DATA[:5000])
    assert _payload_sizes(c) == [1200, 1200, 1200, 1200, 200]


def test_mss_below_48_is_clamped_to_48() -> None:
    # An MSS of 1 would mean one packet per byte (Linux: tcp_min_snd_mss = 48).
    c = established(mss=1)
    c.stack.send(c.flow_id, DATA[:200])
    assert _payload_sizes(c)[:4] == [48, 48, 48, 48]


@pytest.mark.usefixtures("offload_checksums")
def test_mss_offload_super_packets_carry_the_clients_mss_as_gso_size() -> None:
    # With TSO the kernel cuts our super-packets: at the flow's MSS, not at the MTU.
    c = established(Client(make_stack(offload=True), mss=1200))
    c.stack.send(c.flow_id, DATA)
    packets = _offloaded_segments(c)
    assert sum(len(s.payload) for _, s in packets) > 0
    for data, segment in packets:
        n = len(segment.payload)
        if n > 1200:
            assert n % 1200 == 0 or segment.payload[-1:] == DATA[-1:]
            _, gso_type, _, gso_size, _, _ = struct.unpack("<BBHHHH", vnet_header_for(data, 1500))
            assert (gso_type, gso_size) == (1, 1200)


@pytest.mark.usefixtures("offload_checksums")
def test_mss_offload_flow_with_our_mss_keeps_plain_packets() -> None:
    c = established(Client(make_stack(offload=True), mss=1460))
    c.stack.send(c.flow_id, DATA)
    packets = _offloaded_segments(c)
    assert all(type(data) is bytes for data, _ in packets)
    assert any(len(s.payload) > 1460 for _, s in packets)


# ---------------------------------------------------------------- path MTU


def _too_big(c: Client, quoted: bytes, mtu: int) -> bytes:
    """An ICMP error from a router on the way to the client, quoting our packet."""
    if c.version == 4:
        message = IcmpMessage(3, 4, struct.pack("!HH", 0, mtu), quoted[: 576 - 28])
    else:
        message = IcmpMessage(2, 0, struct.pack("!I", mtu), quoted[: 1280 - 48])
    return message.build(c.version, ROUTER[c.version], c.server_addr)


def _flight(c: Client, size: int) -> list[bytes]:
    c.stack.send(c.flow_id, DATA[:size])
    return c.stack.packets_to_send(c.now)


@pytest.mark.parametrize("version", [4, 6])
def test_pmtu_frag_needed_for_a_segment_in_flight_lowers_mss_and_resends(version: int) -> None:
    # RFC 1191 / RFC 8201: the next-hop MTU quoted in the error lowers the flow's MSS, and
    # what the too-big packet carried is resent at once in smaller segments.
    c = established(version=version)
    packets = _flight(c, 4000)
    c.stack.receive_packet(_too_big(c, packets[0], 1400), c.now)
    resent = c.output()
    mss = 1400 - (40 if version == 4 else 60)
    assert resent[0].seq == c.rcv_nxt
    assert [len(s.payload) for s in resent] == [mss, mss, 4000 - 2 * mss]
    assert c.absorb(resent) == DATA[:4000]


def test_pmtu_error_quoting_a_sequence_not_in_flight_is_ignored() -> None:
    # RFC 5927 4.1: check the quoted sequence number against what is in flight.
    c = established()
    packets = _flight(c, 1000)
    forged = bytearray(packets[0])
    forged[24:28] = struct.pack("!I", wrap(c.rcv_nxt + 100_000))  # the TCP sequence number
    c.stack.receive_packet(_too_big(c, bytes(forged), 600), c.now)
    assert c.output() == []
    assert c.stack.drops["icmp_too_big_ignored"] == 1
    c.absorb([TcpSegment.parse(IpPacket.parse(packets[0]))])
    c.send()
    c.stack.send(c.flow_id, DATA[:3000])
    assert [len(s.payload) for s in c.output()] == [1460, 1460, 80]


@pytest.mark.parametrize(("version", "floor"), [(4, 536), (6, 1220)])
def test_pmtu_tiny_mtu_is_floored(version: int, floor: int) -> None:
    # RFC 5927 4.2 / RFC 8201 5: an MTU below 576 (IPv4) or 1280 (IPv6) is not believed.
    c = established(version=version)
    packets = _flight(c, 3000)
    c.stack.receive_packet(_too_big(c, packets[0], 200), c.now)
    assert max(len(s.payload) for s in c.output()) == floor


def test_pmtu_error_for_an_unknown_flow_is_counted() -> None:
    c = established()
    packets = _flight(c, 1000)
    other = bytearray(packets[0])
    other[22:24] = struct.pack("!H", 1)  # another client port
    c.stack.receive_packet(_too_big(c, bytes(other), 1000), c.now)
    assert c.stack.drops["icmp_too_big_ignored"] == 1
    assert c.output() == []


@pytest.mark.usefixtures("offload_checksums")
def test_pmtu_lowered_mss_becomes_the_gso_size_of_super_packets() -> None:
    # With TSO, the MSS learnt from ICMP is what the device must cut at.
    c = established(Client(make_stack(offload=True)))
    packets = _flight(c, 3000)
    c.stack.receive_packet(_too_big(c, packets[0], 1200), c.now)
    resent = c.stack.packets_to_send(c.now)
    assert resent
    _, gso_type, _, gso_size, _, _ = struct.unpack("<BBHHHH", vnet_header_for(resent[0], 1500))
    assert (gso_type, gso_size) == (1, 1160)
