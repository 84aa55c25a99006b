"""Every packet on an uplink of the bed's client namespace, as the leak audit sees them.

tshark runs in the client namespace on the veth (its only way out besides the TUN) and prints
one line per frame. Marker datagrams to the proxy's address, port 9, tell when the capture
runs and when it has seen everything sent before. test_dns.py's capture of port 53 is the same,
with a capture filter.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass

from tests.integration import bed as bedlib

MARKER_PORT = 9
FIELDS = (
    "frame.protocols",
    "ip.src",
    "ip.dst",
    "ipv6.src",
    "ipv6.dst",
    "arp.src.proto_ipv4",
    "arp.dst.proto_ipv4",
    "udp.dstport",
    "tcp.dstport",
    "icmpv6.type",
    "udp.srcport",
    "tcp.srcport",
)
# The link's own IPv6 control plane, sent by the kernel whatever the routes say and never
# routed beyond the link (RFC 4861 router and neighbour discovery, RFC 3810 MLD reports):
# link-local or link-scope multicast addresses only, no user data.
LINK_CONTROL_ICMPV6 = {"133", "134", "135", "136", "143"}


@dataclass(frozen=True)
class Packet:
    protocols: str
    src: str
    dst: str
    dst_port: str
    icmpv6_type: str = ""
    src_port: str = ""

    @property
    def is_marker(self) -> bool:
        return self.dst_port == str(MARKER_PORT) and ":udp" in self.protocols

    def __str__(self) -> str:
        return f"{self.protocols} {self.src} -> {self.dst}:{self.dst_port}"


def parse(line: str) -> Packet:
    cells = (line.rstrip("\n").split("|") + [""] * len(FIELDS))[: len(FIELDS)]
    protocols, ip_src, ip_dst, ip6_src, ip6_dst, arp_src, arp_dst, udp_port, tcp_port = cells[:9]
    return Packet(
        protocols=protocols,
        src=ip_src or ip6_src or arp_src,
        dst=ip_dst or ip6_dst or arp_dst,
        dst_port=udp_port or tcp_port,
        icmpv6_type=cells[9],
        src_port=cells[10] or cells[11],
    )


def is_link_control(packet: Packet) -> bool:
    return (
        packet.icmpv6_type in LINK_CONTROL_ICMPV6
        and packet.src.startswith(("fe80:", "::"))
        and (packet.dst.startswith(("fe80:", "ff02:")))
    )


def leaks(packets: list[Packet], proxy: str, local: str) -> list[Packet]:
    """What is neither to or from the proxy, nor the ARP between this host and the proxy's
    (on-link) address, nor the link's own IPv6 control plane: what the audit must not see."""
    allowed = {frozenset((local, proxy))}
    return [
        p for p in packets if frozenset((p.src, p.dst)) not in allowed and not is_link_control(p)
    ]


class UplinkCapture:
    """tshark on `interface` of the client namespace; `capture_filter` (BPF) narrows what it sees
    and must let the markers (UDP to port 9) through."""

    def __init__(
        self,
        bed: bedlib.Bed,
        interface: str = bedlib.CLI_VETH,
        capture_filter: str | None = None,
    ) -> None:
        self.bed = bed
        self.lines: list[str] = []
        args = ["tshark", "-n", "-l", "-i", interface, "-T", "fields", "-E", "separator=|"]
        if capture_filter is not None:
            args += ["-f", capture_filter]
        for field in FIELDS:
            args += ["-e", field]
        self.proc = subprocess.Popen(
            [*bed.cli_prefix(), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.mark()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def packets(self) -> list[Packet]:
        return [parse(line) for line in list(self.lines)]

    def mark(self) -> None:
        """Send markers until the capture shows one more than before."""
        seen = sum(p.is_marker for p in self.packets())
        send = (
            "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
            f".sendto(b'mark', ('{bedlib.SRV_VETH_IP}', {MARKER_PORT}))"
        )
        deadline = time.monotonic() + 30
        while sum(p.is_marker for p in self.packets()) == seen:
            assert self.proc.poll() is None and time.monotonic() < deadline, "tshark not capturing"
            self.bed.run_cli(["python3", "-c", send], timeout=10, check=True)
            time.sleep(0.3)

    def finish(self) -> list[Packet]:
        """Stop; every packet seen but the markers."""
        self.mark()
        self.stop()
        return [p for p in self.packets() if not p.is_marker]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
