"""A direct UDP association: one protected UDP socket of our own, for the bypass mode.

The counterpart of ``socks5_udp.UdpAssociation`` for ``direct://``, with the same ``send`` /
``close`` / callbacks, so the UDP relay (``tun2socks/udp_relay.py``) keeps one session per
client endpoint whichever it uses. The socket is bound to an ephemeral port of the client's
address family and not connected: datagrams go to any destination with ``sendto`` and replies
from any peer come back (endpoint-independent mapping and filtering, RFC 4787 sections 4.1 and
5, like the association through a proxy). The protection hook (``route.mark`` /
``route.bind_interface``) runs before the bind, so the socket never enters the TUN.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from tun2socks.outbound.socks5 import SocketHook
from tun2socks.outbound.socks5_udp import (
    WRITE_BUFFER_LIMIT,
    CloseCallback,
    DatagramCallback,
)

Host = str | IPv4Address | IPv6Address


class DirectUdpAssociation:
    """Datagrams to any host and port from one protected socket; replies from any peer.

    ``on_datagram(host, port, payload)`` for each datagram received; ``on_close(reason)`` once
    when the socket fails (not after our own ``close()``).
    """

    relay = "direct"  # where datagrams go, for log lines (a proxy association names its relay)

    def __init__(
        self, on_datagram: DatagramCallback, on_close: CloseCallback, own_ports: set[int]
    ) -> None:
        self.on_datagram = on_datagram
        self.on_close = on_close
        self.own_ports = own_ports  # holds our local port while we are open
        self.local_port = 0
        self.sent = 0
        self.received = 0
        self.dropped = 0  # write buffer full, or an ICMP error about an earlier datagram
        self.close_reason: str | None = None
        self._udp: asyncio.DatagramTransport | None = None

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def send(self, host: Host, port: int, payload: bytes | bytearray | memoryview) -> bool:
        """Queue one datagram for ``host:port``; False when it was dropped (closed or full)."""
        udp = self._udp
        if udp is None or self.closed or _buffered(udp) > WRITE_BUFFER_LIMIT:
            self.dropped += 1
            return False
        udp.sendto(payload, (str(host), port))
        self.sent += 1
        return True

    def close(self) -> None:
        self._end("closed by us", notify=False)

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        self.on_datagram(addr[0], addr[1], data)

    def _end(self, reason: str, *, notify: bool = True) -> None:
        if self.closed:
            return
        self.close_reason = reason
        self.own_ports.discard(self.local_port)
        if self._udp is not None:
            self._udp.close()
        if notify:
            self.on_close(reason)


def _buffered(transport: asyncio.DatagramTransport) -> int:
    # asyncio's UDP transport has it, but it is not in the DatagramTransport ABC.
    size: Callable[[], int] = getattr(transport, "get_write_buffer_size", lambda: 0)
    return size()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, association: DirectUdpAssociation) -> None:
        self.association = association

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.association._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error about an earlier datagram (a port unreachable, say): the socket serves
        # every destination of the session, so one peer's error ends nothing. Count it.
        self.association.dropped += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.association._end(f"UDP socket failed: {exc}" if exc else "UDP socket closed")


async def open_direct_udp(
    version: int,
    *,
    prepare_socket: SocketHook | None,
    on_datagram: DatagramCallback,
    on_close: CloseCallback,
    own_ports: set[int] | None = None,
) -> DirectUdpAssociation:
    """A direct association for clients of IP ``version`` (4 or 6); raises OSError (a
    protection that cannot be set: ``PermissionError`` without CAP_NET_ADMIN, say). Its local
    port is in ``own_ports`` while it is open: unprotected, the socket may be routed into the
    TUN, and the relay then knows its datagrams for ours."""
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if prepare_socket is not None:
            prepare_socket(sock)
        sock.bind(("::" if version == 6 else "0.0.0.0", 0))
        ports = own_ports if own_ports is not None else set()
        association = DirectUdpAssociation(on_datagram, on_close, ports)
        association.local_port = sock.getsockname()[1]
        association.own_ports.add(association.local_port)
        loop = asyncio.get_running_loop()
        association._udp, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(association), sock=sock
        )
    except BaseException:
        with contextlib.suppress(OSError):
            sock.close()
        raise
    return association


__all__ = ["DirectUdpAssociation", "open_direct_udp"]
