"""The virtio_net_hdr that precedes every packet on a TUN opened with IFF_VNET_HDR (offload mode).

Pure: bytes in, bytes out. The header layout and flags are linux/virtio_net.h's. On write, TCP
and UDP carry only the pseudo-header sum (NEEDS_CSUM) and the kernel finishes the checksum; TCP
bigger than the MTU is marked GSO so the kernel cuts it into MTU-sized segments.
"""

from __future__ import annotations

import struct

# linux/virtio_net.h
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VNET_HDR_LEN = 10  # sizeof(struct virtio_net_hdr), the TUN default (TUNGETVNETHDRSZ)
VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
# A packet read with either flag has a checksum the stack must not verify (partial or checked).
CHECKSUM_TRUSTED = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID
_NEEDS_CSUM = VIRTIO_NET_HDR_F_NEEDS_CSUM
_IPPROTO_TCP = 6
_IPPROTO_UDP = 17
_TCP_CHECK = 16  # offsetof(struct tcphdr, check)
_UDP_CHECK = 6  # offsetof(struct udphdr, check)
_HDR_COMPLETE = VNET_HDR.pack(0, 0, 0, 0, 0, 0)  # checksum already complete (ICMP, fragments)


def vnet_header_for(packet: bytes, mtu: int) -> bytes:
    """The virtio_net_hdr to write before `packet` in offload mode.

    TCP and UDP carry only the pseudo-header sum (NEEDS_CSUM): the kernel finishes the checksum when
    it must. TCP bigger than the MTU is marked GSO so the kernel can cut it into MTU-sized segments.
    """
    n = len(packet)
    if n < 20:
        return _HDR_COMPLETE
    version = packet[0] >> 4
    if version == 4:
        ip_len = (packet[0] & 0x0F) * 4
        if ip_len < 20 or packet[6] & 0x3F or packet[7]:  # MF or offset: not a whole datagram
            return _HDR_COMPLETE
        proto = packet[9]
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    elif version == 6:
        # Only TCP/UDP right after the fixed header; with extension headers the stack's sum stays.
        ip_len = 40
        proto = packet[6]
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6
    else:
        return _HDR_COMPLETE
    if proto == _IPPROTO_TCP and n >= ip_len + 20:
        l4_len = ip_len + (packet[ip_len + 12] >> 4) * 4
        # gso_size: the segment payload the kernel cuts the super-packet into; the MTU's,
        # or the flow's MSS when the stack says so (GsoPacket).
        gso_size = getattr(packet, "gso_size", mtu - l4_len)
        if n - l4_len > gso_size:
            return VNET_HDR.pack(_NEEDS_CSUM, gso_type, l4_len, gso_size, ip_len, _TCP_CHECK)
        return VNET_HDR.pack(_NEEDS_CSUM, 0, 0, 0, ip_len, _TCP_CHECK)
    if proto == _IPPROTO_UDP and n >= ip_len + 8:
        return VNET_HDR.pack(_NEEDS_CSUM, 0, 0, 0, ip_len, _UDP_CHECK)
    return _HDR_COMPLETE
