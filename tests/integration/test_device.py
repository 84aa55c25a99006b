"""TunDevice against the real kernel, inside a network namespace each test creates and deletes.

The test process itself enters the namespace (setns via pyroute2.netns.pushns) for the duration of a
test, so the TUN, the netlink socket and the kernel sockets it uses all live there; `ip` commands
run as children inherit it. Packets sent to the kernel are built here by hand with struct.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Interface, IPv6Interface, ip_address

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netns import popns, pushns  # type: ignore[import-untyped]

from tun2socks.device import DeviceError, TunDevice
from tun2socks.net.vnet import VNET_HDR, vnet_header_for

if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None:
    pytest.skip(
        "needs root, /dev/net/tun and iproute2 (network namespaces)", allow_module_level=True
    )

pytestmark = pytest.mark.integration

DEV = "t2s0"
MTU = 1500
HOST4, PEER4 = "198.18.77.1", "198.18.77.2"  # HOST: the kernel's side; PEER: "behind" the TUN
HOST6, PEER6 = "fd77::1", "fd77::2"
ADDRESSES: list[IPv4Interface | IPv6Interface] = [
    IPv4Interface(f"{HOST4}/24"),
    IPv6Interface(f"{HOST6}/64"),
]
TIMEOUT = 5.0
Packet = tuple[bytes, bool]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"t2s-dev-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        pushns(name)
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield name
        finally:
            popns()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


@pytest.fixture
def open_device(netns: str, loop: asyncio.AbstractEventLoop) -> Iterator[Callable[..., TunDevice]]:
    """TunDevice.open inside the namespace; every device is closed before the namespace goes."""
    devices: list[TunDevice] = []

    def open_(
        name: str = DEV, *, offload: bool = False, mtu: int = MTU, txqueuelen: int | None = None
    ) -> TunDevice:
        device = TunDevice.open(
            name, mtu=mtu, addresses=ADDRESSES, offload=offload, txqueuelen=txqueuelen
        )
        devices.append(device)
        return device

    yield open_
    for device in devices:
        device.close()


class Reader:
    """Starts a device and keeps every batch it hands over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, device: TunDevice, batch: int = 64) -> None:
        self.loop = loop
        self.batches: list[list[Packet]] = []
        self._arrived = asyncio.Event()
        device.start(loop, self._on_packets, batch=batch)

    def _on_packets(self, packets: list[Packet]) -> None:
        self.batches.append(packets)
        self._arrived.set()

    def packets(self) -> list[Packet]:
        return [packet for batch in self.batches for packet in batch]

    def wait_for(self, match: Callable[[bytes], bool], count: int = 1) -> list[Packet]:
        async def matching() -> list[Packet]:
            while len(found := [p for p in self.packets() if match(p[0])]) < count:
                self._arrived.clear()
                await self._arrived.wait()
            return found

        return self.loop.run_until_complete(asyncio.wait_for(matching(), TIMEOUT))


# --- packet building and parsing (independent of the project's own codec) ---


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


def pseudo_sum(src: str, dst: str, proto: int, length: int) -> int:
    addresses = ip_address(src).packed + ip_address(dst).packed
    return ones_sum(addresses + struct.pack("!HH", proto, length))


def ip_packet(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    if ip_address(src).version == 6:
        addresses = ip_address(src).packed + ip_address(dst).packed
        return struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + addresses + l4
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
        ip_address(src).packed, ip_address(dst).packed,
    )  # fmt: skip
    check = struct.pack("!H", ~ones_sum(header) & 0xFFFF)
    return header[:10] + check + header[12:] + l4


def with_l4_checksum(
    src: str, dst: str, proto: int, l4: bytes, offset: int, partial: bool
) -> bytes:
    """l4 with its checksum field set: complete, or only the pseudo-header sum (offload)."""
    total = pseudo_sum(src, dst, proto, len(l4))
    check = total if partial else (~fold(total + ones_sum(l4)) & 0xFFFF) or 0xFFFF
    return ip_packet(src, dst, proto, l4[:offset] + struct.pack("!H", check) + l4[offset + 2 :])


def udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes, partial: bool) -> bytes:
    l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return with_l4_checksum(src, dst, 17, l4, 6, partial)


def tcp_ack_packet(src: str, dst: str, dport: int, seq: int, ack: int, payload: bytes) -> bytes:
    l4 = struct.pack("!HHIIBBHHH", 40000, dport, seq, ack, 5 << 4, 0x18, 65535, 0, 0) + payload
    return with_l4_checksum(src, dst, 6, l4, 16, partial=True)


def icmp_echo_request(ident: int, payload: bytes) -> bytes:
    message = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    check = struct.pack("!H", ~ones_sum(message) & 0xFFFF)
    return ip_packet(PEER4, HOST4, 1, message[:2] + check + message[4:])


def parse(packet: bytes) -> tuple[str, str, int, bytes]:
    """(src, dst, protocol, L4 bytes) of an IPv4 or IPv6 packet without extension headers."""
    if packet[0] >> 4 == 6:
        return str(ip_address(packet[8:24])), str(ip_address(packet[24:40])), packet[6], packet[40:]
    ip_len = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    src, dst = str(ip_address(packet[12:16])), str(ip_address(packet[16:20]))
    return src, dst, packet[9], packet[ip_len:total]


def l4_checksum_ok(packet: bytes) -> bool:
    src, dst, proto, l4 = parse(packet)
    return fold(pseudo_sum(src, dst, proto, len(l4)) + ones_sum(l4)) == 0xFFFF


def is_udp_to(dst: str, dport: int) -> Callable[[bytes], bool]:
    def match(packet: bytes) -> bool:
        _, to, proto, l4 = parse(packet)
        return to == dst and proto == 17 and struct.unpack_from("!H", l4, 2)[0] == dport

    return match


def bound_udp_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(TIMEOUT)
    return sock


# --- tests ---


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_open_creates_device_with_mtu_addresses_and_up(
    open_device: Callable[..., TunDevice], offload: bool
) -> None:
    device = open_device(offload=offload, mtu=1400)

    assert (device.name, device.mtu, device.created, device.offload) == (DEV, 1400, True, offload)
    with IPRoute() as ipr:
        (link,) = ipr.get_links(ifname=DEV)
        addresses = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=link["index"])
        }
    assert link.get_attr("IFLA_MTU") == 1400
    assert link["flags"] & 1  # IFF_UP
    assert {(HOST4, 24), (HOST6, 64)} <= addresses


def test_txqueuelen_is_set_when_configured_and_left_alone_otherwise(
    open_device: Callable[..., TunDevice],
) -> None:
    open_device(txqueuelen=2000)
    with IPRoute() as ipr:
        (link,) = ipr.get_links(ifname=DEV)
        assert link.get_attr("IFLA_TXQLEN") == 2000
    open_device("t2s-other")
    with IPRoute() as ipr:
        (link,) = ipr.get_links(ifname="t2s-other")
        assert link.get_attr("IFLA_TXQLEN") == 500  # the kernel's default for a TUN


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
@pytest.mark.parametrize(("host", "peer"), [(HOST4, PEER4), (HOST6, PEER6)], ids=["v4", "v6"])
def test_kernel_udp_datagram_is_read_from_tun(
    open_device: Callable[..., TunDevice],
    loop: asyncio.AbstractEventLoop,
    offload: bool,
    host: str,
    peer: str,
) -> None:
    device = open_device(offload=offload)
    reader = Reader(loop, device)
    with bound_udp_socket(host) as sock:
        sock.sendto(b"hello tun", (peer, 9))

    ((packet, trusted),) = reader.wait_for(is_udp_to(peer, 9))

    src, _, _, l4 = parse(packet)
    assert (src, l4[8:]) == (host, b"hello tun")
    if offload:
        # Offloaded: the kernel left the checksum partial and says so in the vnet header.
        assert trusted
    else:
        assert not trusted
        assert l4_checksum_ok(packet)
    assert device.stats.packets_in == len(reader.packets())
    assert device.stats.bytes_in == sum(len(p) for p, _ in reader.packets())


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
@pytest.mark.parametrize(("host", "peer"), [(HOST4, PEER4), (HOST6, PEER6)], ids=["v4", "v6"])
def test_written_udp_packet_reaches_kernel_socket(
    open_device: Callable[..., TunDevice], offload: bool, host: str, peer: str
) -> None:
    device = open_device(offload=offload)
    with bound_udp_socket(host) as sock:
        port = sock.getsockname()[1]
        # In offload mode the stack writes only the pseudo-header sum (the NEEDS_CSUM convention).
        device.write([udp_packet(peer, 5353, host, port, b"from the stack", partial=offload)])

        data, sender = sock.recvfrom(2048)

    assert (data, sender[0], sender[1]) == (b"from the stack", peer, 5353)
    assert (device.stats.packets_out, device.stats.write_errors) == (1, 0)


def test_plain_mode_partial_checksum_is_dropped_by_kernel(
    open_device: Callable[..., TunDevice],
) -> None:
    """Control for the test above: without the vnet header the pseudo-header sum is wrong."""
    device = open_device(offload=False)
    with bound_udp_socket(HOST4) as sock:
        port = sock.getsockname()[1]
        device.write(
            [
                udp_packet(PEER4, 5353, HOST4, port, b"partial", partial=True),
                udp_packet(PEER4, 5353, HOST4, port, b"complete", partial=False),
            ]
        )

        assert sock.recv(2048) == b"complete"


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_written_icmp_echo_request_is_answered(
    open_device: Callable[..., TunDevice], loop: asyncio.AbstractEventLoop, offload: bool
) -> None:
    device = open_device(offload=offload)
    reader = Reader(loop, device)

    device.write([icmp_echo_request(0x7777, b"ping payload")])

    def is_echo_reply(packet: bytes) -> bool:
        _, dst, proto, l4 = parse(packet)
        return dst == PEER4 and proto == 1 and l4[0] == 0

    ((reply, _),) = reader.wait_for(is_echo_reply)
    _, _, _, l4 = parse(reply)
    assert struct.unpack_from("!HH", l4, 4) == (0x7777, 1)
    assert l4[8:] == b"ping payload"


@pytest.mark.parametrize(("host", "peer"), [(HOST4, PEER4), (HOST6, PEER6)], ids=["v4", "v6"])
def test_offload_tcp_super_packet_is_accepted_by_kernel(
    open_device: Callable[..., TunDevice], loop: asyncio.AbstractEventLoop, host: str, peer: str
) -> None:
    """A TCP packet bigger than the MTU goes out with a GSO header; the kernel answers with RST.

    No socket listens on the port, so the kernel resets with seq = our ACK (RFC 9293 3.10.7.1):
    that reply proves the kernel took the 8 KB segment (a wrong header makes write() fail).
    """
    device = open_device(offload=True)
    assert device.offload
    reader = Reader(loop, device)

    device.write([tcp_ack_packet(peer, host, 9, seq=1000, ack=0x12345678, payload=bytes(8000))])

    def is_rst(packet: bytes) -> bool:
        _, dst, proto, l4 = parse(packet)
        return dst == peer and proto == 6 and bool(l4[13] & 0x04)

    ((rst, _),) = reader.wait_for(is_rst)
    assert struct.unpack_from("!I", parse(rst)[3], 4) == (0x12345678,)
    device.drain()  # the writer thread counts a packet after its write returns: let it end
    assert (device.stats.packets_out, device.stats.write_errors) == (1, 0)


def tcp_with_options(src: str, dst: str, option_words: int, payload_len: int) -> bytes:
    doff = 5 + option_words
    l4 = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, doff << 4, 0x10, 0, 0, 0) + bytes(4 * option_words)
    return ip_packet(src, dst, 6, l4 + bytes(payload_len))


def fragment_of(packet: bytes) -> bytes:
    return packet[:6] + b"\x20\x00" + packet[8:]  # MF set


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (tcp_with_options(PEER4, HOST4, 0, 8000), (1, 1, 40, 1460, 20, 16)),
        (tcp_with_options(PEER6, HOST6, 3, 8000), (1, 4, 72, 1428, 40, 16)),
        (tcp_with_options(PEER4, HOST4, 0, 1460), (1, 0, 0, 0, 20, 16)),  # exactly the MTU
        (udp_packet(PEER6, 1, HOST6, 2, bytes(3000), partial=True), (1, 0, 0, 0, 40, 6)),
        (icmp_echo_request(1, b"x"), (0, 0, 0, 0, 0, 0)),
        (fragment_of(udp_packet(PEER4, 1, HOST4, 2, b"x", partial=True)), (0, 0, 0, 0, 0, 0)),
        (ip_packet(PEER6, HOST6, 0, bytes(48)), (0, 0, 0, 0, 0, 0)),  # hop-by-hop header first
    ],
    ids=["tcp4-gso", "tcp6-gso-options", "tcp4-mtu", "udp6", "icmp", "fragment", "ipv6-ext"],
)
def test_write_vnet_header(packet: bytes, expected: tuple[int, ...]) -> None:
    assert VNET_HDR.unpack(vnet_header_for(packet, MTU)) == expected


def test_reads_are_batched_up_to_batch_size(
    open_device: Callable[..., TunDevice], loop: asyncio.AbstractEventLoop
) -> None:
    device = open_device()
    reader = Reader(loop, device, batch=4)
    with bound_udp_socket(HOST4) as sock:
        for i in range(10):
            sock.sendto(b"%d" % i, (PEER4, 9))

    datagrams = reader.wait_for(is_udp_to(PEER4, 9), count=10)

    assert [parse(p)[3][8:] for p, _ in datagrams] == [b"%d" % i for i in range(10)]
    assert len(reader.batches) >= 3
    assert max(len(batch) for batch in reader.batches) <= 4  # a quiet loop: `batch` at a time


def test_reads_grow_with_the_time_the_loop_was_away(
    open_device: Callable[..., TunDevice], loop: asyncio.AbstractEventLoop
) -> None:
    device = open_device()
    reader = Reader(loop, device, batch=4)
    with bound_udp_socket(HOST4) as sock:
        for i in range(40):
            sock.sendto(b"%d" % i, (PEER4, 9))
    time.sleep(0.05)  # the loop is busy elsewhere for 10 batch intervals: 40 packets at once
    datagrams = reader.wait_for(is_udp_to(PEER4, 9), count=40)
    assert [parse(p)[3][8:] for p, _ in datagrams] == [b"%d" % i for i in range(40)]
    assert max(len(batch) for batch in reader.batches) > 4


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_attach_to_persistent_tun(
    open_device: Callable[..., TunDevice], loop: asyncio.AbstractEventLoop, offload: bool
) -> None:
    subprocess.run(["ip", "tuntap", "add", "dev", "t2s-p", "mode", "tun"], check=True)
    device = open_device("t2s-p", offload=offload)
    reader = Reader(loop, device)

    assert (device.created, device.offload) == (False, offload)
    with bound_udp_socket(HOST4) as sock:
        sock.sendto(b"persistent", (PEER4, 9))
    reader.wait_for(is_udp_to(PEER4, 9))
    device.close()
    assert socket.if_nametoindex("t2s-p") > 0  # persistent: still there after we let go


def test_close_is_idempotent_and_removes_created_device(
    open_device: Callable[..., TunDevice], loop: asyncio.AbstractEventLoop
) -> None:
    device = open_device()
    Reader(loop, device)
    assert socket.if_nametoindex(DEV) > 0

    device.close()
    device.close()

    with pytest.raises(OSError):
        socket.if_nametoindex(DEV)


def test_busy_device_is_a_clear_error(open_device: Callable[..., TunDevice]) -> None:
    open_device()

    with pytest.raises(
        DeviceError, match=r"^cannot open TUN device t2s0: device in use by another"
    ):
        open_device()


DEVICE_ERROR_PROBE = """
from ipaddress import IPv4Interface
from tun2socks.device import DeviceError, TunDevice
try:
    TunDevice.open("t2s0", mtu=1500, addresses=[IPv4Interface("198.18.77.1/24")], offload=False)
except DeviceError as exc:
    print(exc)
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_without_cap_net_admin_is_a_clear_error(netns: str) -> None:
    drop = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"]
    probe = subprocess.run(
        [*drop, sys.executable, "-c", DEVICE_ERROR_PROBE],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip

    assert probe.stdout == "cannot open TUN device t2s0: need root or CAP_NET_ADMIN\n", probe.stderr


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_missing_dev_net_tun_is_a_clear_error(netns: str) -> None:
    # A private mount namespace hides /dev/net under an empty tmpfs for the child only.
    script = f"mount -t tmpfs none /dev/net && exec {sys.executable} -c '{DEVICE_ERROR_PROBE}'"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip

    assert "/dev/net/tun is missing" in probe.stdout, probe.stderr


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_multi_queue_tun_is_a_clear_error(
    open_device: Callable[..., TunDevice], offload: bool
) -> None:
    subprocess.run(
        ["ip", "tuntap", "add", "dev", "t2s-mq", "mode", "tun", "multi_queue"], check=True
    )

    with pytest.raises(DeviceError, match=r"^cannot attach to t2s-mq: .* not a single-queue TUN"):
        open_device("t2s-mq", offload=offload)
