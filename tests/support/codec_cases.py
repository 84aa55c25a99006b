"""The wire codec's test material (tests/unit/net/test_codec*.py): golden packets made once by
scapy and checked field by field, reference checksums, and hypothesis strategies for segments,
datagrams and ICMP messages."""

from __future__ import annotations

import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6

from tun2socks.net.checksum import checksum
from tun2socks.net.icmp import IcmpMessage
from tun2socks.net.ip import IpPacket
from tun2socks.net.tcp import SYN, TcpOptions, TcpSegment
from tun2socks.net.udp import UdpDatagram

SRC4 = IPv4Address("192.0.2.1").packed
DST4 = IPv4Address("198.51.100.2").packed
SRC6 = IPv6Address("2001:db8::1").packed
DST6 = IPv6Address("2001:db8::2").packed
ADDRS = {4: (SRC4, DST4), 6: (SRC6, DST6)}

SYN_OPTIONS = TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(0x11223344, 0))

# IPv4 (DF, TTL 64) 192.0.2.1:40000 -> 198.51.100.2:80, SYN seq 0x01020304, window 64240,
# options MSS 1460, SACK-permitted, timestamps (0x11223344, 0), NOP, window scale 7.
GOLDEN_SYN4 = bytes.fromhex(
    "4500003c0000400040064e85c0000201c6336402"
    "9c4000500102030400000000a002faf07bdb0000"
    "020405b40402080a112233440000000001030307"
)
# IPv6 (hop limit 64) [2001:db8::1]:40000 -> [2001:db8::2]:443, SYN seq 0xA1B2C3D4,
# window 64800, the same options with MSS 1440.
GOLDEN_SYN6 = bytes.fromhex(
    "6000000000280640"
    "20010db8000000000000000000000001"
    "20010db8000000000000000000000002"
    "9c4001bba1b2c3d400000000a002fd20a7950000"
    "020405a00402080a112233440000000001030307"
)
# IPv4 UDP 192.0.2.1:53000 -> 198.51.100.2:53, payload "hello".
GOLDEN_UDP4 = bytes.fromhex("450000210000400040114e95c0000201c6336402cf080035000d008d68656c6c6f")
# IPv6 UDP [2001:db8::1]:53000 -> [2001:db8::2]:53, payload "hello".
GOLDEN_UDP6 = bytes.fromhex(
    "60000000000d1140"
    "20010db8000000000000000000000001"
    "20010db8000000000000000000000002"
    "cf080035000d914f"
    "68656c6c6f"
)
# ICMPv4 echo request id 0x1234 seq 1 payload "ping".
GOLDEN_ECHO4 = bytes.fromhex("450000200000400040014ea6c0000201c6336402080006fa1234000170696e67")
# ICMPv6 echo request id 0x1234 seq 1 payload "ping".
GOLDEN_ECHO6 = bytes.fromhex(
    "60000000000c3a40"
    "20010db8000000000000000000000001"
    "20010db8000000000000000000000002"
    "8000333e12340001"
    "70696e67"
)

GOLDEN_SYN4_SEGMENT = TcpSegment(40000, 80, 0x01020304, 0, SYN, 64240, b"", SYN_OPTIONS)
GOLDEN_SYN6_SEGMENT = TcpSegment(
    40000, 443, 0xA1B2C3D4, 0, SYN, 64800, b"", TcpOptions(1440, 7, True, (0x11223344, 0))
)

GOLDEN_PACKETS: list[tuple[str, bytes, Callable[[IpPacket, bool], object]]] = [
    ("syn4", GOLDEN_SYN4, TcpSegment.parse),
    ("syn6", GOLDEN_SYN6, TcpSegment.parse),
    ("udp4", GOLDEN_UDP4, UdpDatagram.parse),
    ("udp6", GOLDEN_UDP6, UdpDatagram.parse),
    ("echo4", GOLDEN_ECHO4, IcmpMessage.parse),
    ("echo6", GOLDEN_ECHO6, IcmpMessage.parse),
]
GOLDEN_IDS = [name for name, _, _ in GOLDEN_PACKETS]


def naive_ones_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 section 4.1, word by word: the reference our fast version must match."""
    if len(data) % 2:
        data += b"\0"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def naive_checksum(data: bytes) -> int:
    return ~naive_ones_sum(data) & 0xFFFF


def pseudo_header(src: bytes, dst: bytes, protocol: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, protocol, length)
    return src + dst + struct.pack("!IxxxB", length, protocol)


def l4_of(packet: bytes) -> bytes:
    """The upper-layer bytes of a packet without IPv4 options or IPv6 extension headers."""
    if packet[0] >> 4 == 4:
        return packet[20 : struct.unpack_from("!H", packet, 2)[0]]
    return packet[40:]


def with_ipv4_header_checksum(packet: bytearray) -> bytes:
    ihl = (packet[0] & 0x0F) * 4
    packet[10:12] = b"\0\0"
    packet[10:12] = checksum(packet[:ihl]).to_bytes(2, "big")
    return bytes(packet)


# --- hypothesis strategies -------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
versions = st.sampled_from([4, 6])
payloads = st.binary(max_size=1500)
tcp_options = st.builds(
    TcpOptions,
    mss=st.none() | u16,
    wscale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    timestamp=st.none() | st.tuples(u32, u32),
    sack_blocks=st.lists(st.tuples(u32, u32), max_size=4).map(tuple),
).filter(lambda options: len(options.build()) <= 40)  # the data offset allows 40 bytes
tcp_segments = st.builds(
    TcpSegment,
    src_port=u16,
    dst_port=u16,
    seq=u32,
    ack=u32,
    flags=st.integers(0, 0xFF),
    window=u16,
    payload=payloads,
    options=tcp_options,
)
udp_datagrams = st.builds(UdpDatagram, src_port=u16, dst_port=u16, payload=payloads)
icmp_messages = st.builds(
    IcmpMessage,
    type=st.integers(0, 0xFF),
    code=st.integers(0, 0xFF),
    rest_of_header=st.binary(min_size=4, max_size=4),
    payload=payloads,
)


def scapy_parse(data: bytes) -> IP | IPv6:
    """The packet as scapy reads it (the independent implementation)."""
    return IP(data) if data[0] >> 4 == 4 else IPv6(data)
