"""SOCKS5 UDP ASSOCIATE (RFC 1928 section 7): datagrams to any destination through the proxy.

Theory of operation: ``associate`` opens the TCP control connection with the handshake shared
with CONNECT (``socks5.request``). Before the request goes out, a UDP socket is bound to the
control connection's local address, and the request names that exact endpoint, so the proxy
can accept datagrams from it alone. The reply's BND.ADDR:BND.PORT is the proxy's relay; the UDP
socket is connected to it, so the kernel delivers only the relay's datagrams to us. Each
datagram both ways carries the section 7 header (``socks5_wire.build_udp_datagram`` /
``parse_udp_datagram``) naming the remote peer.

The association lives as long as its control connection (section 7: "A UDP association
terminates when the TCP connection that the UDP ASSOCIATE request arrived on terminates"). The
control connection is watched: when the proxy closes or resets it, ``on_close`` runs once with
the reason, and the UDP socket closes too. Nothing is logged here; callers log.

Usage::

    assoc = await associate(proxy, timeout=10.0, on_datagram=lambda host, port, data: ...)
    assoc.send("198.51.100.7", 53, query)
    ...
    assoc.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from socket import AF_INET

from tun2socks.outbound.socks5 import (
    ProxyEndpoint,
    SocketHook,
    Socks5ProtocolError,
    Socks5Timeout,
    format_host_port,
    request,
)
from tun2socks.outbound.socks5_wire import (
    Command,
    Socks5WireError,
    build_udp_datagram,
    encode_address,
    parse_udp_datagram,
)

# The largest UDP payload a socket of each family can send (IPv4 total length 65535 minus the
# IP and UDP headers; IPv6 payload length 65535 minus the UDP header).
MAX_UDP_PAYLOAD: dict[int, int] = {socket.AF_INET: 65535 - 20 - 8, socket.AF_INET6: 65535 - 8}
# Datagrams queued in the kernel-bound write buffer beyond this are dropped: UDP may lose
# packets, and memory must stay bounded when the proxy is slower than the client.
WRITE_BUFFER_LIMIT = 1024 * 1024

DatagramCallback = Callable[[str, int, bytes], None]
CloseCallback = Callable[[str], None]
Host = str | IPv4Address | IPv6Address


class DatagramTooLarge(ValueError):
    """A payload that cannot fit in one relay datagram; ``max_payload`` is what would fit."""

    def __init__(self, size: int, max_payload: int) -> None:
        super().__init__(f"UDP payload of {size} bytes exceeds {max_payload} through the proxy")
        self.size = size
        self.max_payload = max_payload


class UdpAssociation:
    """One UDP ASSOCIATE: send datagrams to any host and port, receive replies from any peer.

    ``on_datagram(host, port, payload)`` is called for each datagram the relay sends us (the
    host is the remote peer, usually an IP literal); ``on_close(reason)`` once when the
    association ends for any reason other than our own ``close()``. Both may be set after
    ``associate`` returns.
    """

    def __init__(
        self,
        proxy: ProxyEndpoint,
        relay: tuple[str, int],
        family: int,
        on_datagram: DatagramCallback | None,
        on_close: CloseCallback | None,
    ) -> None:
        self.proxy = proxy
        self.relay = relay
        self.family = family
        self.on_datagram = on_datagram
        self.on_close = on_close
        self.sent = 0
        self.received = 0
        self.dropped = 0  # write buffer full, or malformed/fragmented datagrams from the relay
        self.close_reason: str | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._control: asyncio.Transport | None = None
        self._closed = asyncio.get_running_loop().create_future()

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def max_payload(self, host: Host) -> int:
        """The largest payload ``send`` accepts for ``host`` (the header's size depends on it)."""
        return MAX_UDP_PAYLOAD[self.family] - 3 - len(encode_address(host, 0))

    def send(self, host: Host, port: int, payload: bytes | bytearray | memoryview) -> bool:
        """Queue one datagram for ``host:port``; False when it was dropped (closed or full).

        Raises ``DatagramTooLarge`` when the payload cannot fit in one datagram to the relay,
        ``ValueError`` for a bad port or name.
        """
        datagram = build_udp_datagram(host, port, payload)
        if len(datagram) > MAX_UDP_PAYLOAD[self.family]:
            raise DatagramTooLarge(len(payload), self.max_payload(host))
        udp = self._udp
        if udp is None or self.closed or _buffered(udp) > WRITE_BUFFER_LIMIT:
            self.dropped += 1
            return False
        udp.sendto(datagram)
        self.sent += 1
        return True

    def close(self) -> None:
        """End the association (closes the control connection, so the proxy frees the relay)."""
        self._end("closed by us", notify=False)

    async def wait_closed(self) -> str:
        """Wait until the association has ended; the reason."""
        return await asyncio.shield(self._closed)

    def __repr__(self) -> str:
        state = f"closed: {self.close_reason}" if self.closed else "open"
        relay = format_host_port(*self.relay)
        return f"<UdpAssociation proxy={self.proxy.address} relay={relay} {state}>"

    # -- called by the protocols ------------------------------------------------------------

    def _datagram(self, data: bytes) -> None:
        try:
            host, port, payload = parse_udp_datagram(data)
        except Socks5WireError:
            self.dropped += 1
            return
        self.received += 1
        if self.on_datagram is not None:
            self.on_datagram(host, port, bytes(payload))

    def _end(self, reason: str, *, notify: bool = True) -> None:
        if self.closed:
            return
        self.close_reason = reason
        for transport in (self._udp, self._control):
            if transport is not None:
                transport.close()
        if not self._closed.done():
            self._closed.set_result(reason)
        if notify and self.on_close is not None:
            self.on_close(reason)


class _RelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, association: UdpAssociation) -> None:
        self.association = association

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.association._datagram(data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error about an earlier datagram (e.g. the relay port is gone): the control
        # connection tells whether the association is over, so only count it.
        self.association.dropped += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.association._end(f"UDP socket failed: {exc}" if exc else "UDP socket closed")


class _ControlProtocol(asyncio.Protocol):
    """Watches the control connection; the proxy sends nothing on it after the reply."""

    def __init__(self, association: UdpAssociation) -> None:
        self.association = association

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.association._end("proxy closed the control connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"control connection failed: {exc}" if exc else "control connection closed"
        self.association._end(reason)


async def associate(
    proxy: ProxyEndpoint,
    *,
    timeout: float,
    prepare_socket: SocketHook | None = None,
    on_datagram: DatagramCallback | None = None,
    on_close: CloseCallback | None = None,
) -> UdpAssociation:
    """A UDP association through ``proxy``, ready to ``send``.

    ``timeout`` bounds connecting, the handshake and setting up the UDP socket together.
    ``prepare_socket`` runs on both the control socket and the UDP socket (SO_MARK, ...).
    Raises a ``Socks5Error`` subclass on failure (``Socks5ReplyError`` with ``reply_code`` 7,
    "command not supported", when the proxy has no UDP ASSOCIATE).
    """
    loop = asyncio.get_running_loop()
    udp_sock: socket.socket | None = None

    def bind_udp(control: socket.socket) -> tuple[str, int]:
        nonlocal udp_sock
        local_ip = control.getsockname()[0]
        udp_sock = socket.socket(control.family, socket.SOCK_DGRAM)
        udp_sock.setblocking(False)
        if prepare_socket is not None:
            prepare_socket(udp_sock)
        udp_sock.bind((local_ip, 0))
        return local_ip, udp_sock.getsockname()[1]

    unspecified = "::" if ":" in proxy.host else "0.0.0.0"
    control: socket.socket | None = None
    association: UdpAssociation | None = None
    try:
        async with asyncio.timeout(timeout):
            control, bound = await request(
                proxy,
                Command.UDP_ASSOCIATE,
                unspecified,
                0,
                timeout=timeout,
                # One round trip per message: an association lives long, so the extra round
                # trips cost little, and servers that cannot take the messages together
                # (microsocks) then answer "command not supported" instead of hanging.
                pipeline=False,
                prepare_socket=prepare_socket,
                address_from_socket=bind_udp,
            )
            assert udp_sock is not None
            relay = _relay_address(bound, control)
            try:
                await loop.sock_connect(udp_sock, relay)
            except OSError as exc:
                raise Socks5ProtocolError(
                    f"cannot use the UDP relay {format_host_port(*relay)}: {exc.strerror or exc}",
                    proxy.address,
                    format_host_port(*udp_sock.getsockname()[:2]),
                    "UDP ASSOCIATE",
                ) from None
            association = UdpAssociation(proxy, relay, udp_sock.family, on_datagram, on_close)
            # The transports own the sockets from here on; closing the association closes both.
            association._udp, _ = await loop.create_datagram_endpoint(
                lambda: _RelayProtocol(association), sock=udp_sock
            )
            udp_sock = None
            association._control, _ = await loop.create_connection(
                lambda: _ControlProtocol(association), sock=control
            )
            control = None
    except TimeoutError:
        _close_all(udp_sock, control)
        if association is not None:
            association.close()
        raise Socks5Timeout(
            f"timed out after {timeout:g} s setting up the UDP relay",
            proxy.address,
            "UDP relay",
            "UDP ASSOCIATE",
        ) from None
    except BaseException:
        _close_all(udp_sock, control)
        if association is not None:
            association.close()
        raise
    return association


def _relay_address(bound: tuple[str, int], control: socket.socket) -> tuple[str, int]:
    """Where to send datagrams: the reply's address, or the proxy's own when it is all zeros
    (a common answer meaning "the address you reached me at")."""
    host, port = bound
    try:
        address = ip_address(host)
    except ValueError:
        address = None  # a name: unusual, but resolvable by the connect below
    if address is not None and address.is_unspecified:
        host = control.getpeername()[0]
    elif isinstance(address, IPv6Address) and address.ipv4_mapped and control.family == AF_INET:
        host = str(address.ipv4_mapped)
    return host, port


def _buffered(transport: asyncio.DatagramTransport) -> int:
    # Both asyncio's and uvloop's UDP transports have it, but it is not in the ABC.
    size: Callable[[], int] = getattr(transport, "get_write_buffer_size", lambda: 0)
    return size()


def _close_all(*socks: socket.socket | None) -> None:
    for sock in socks:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


__all__ = [
    "MAX_UDP_PAYLOAD",
    "DatagramTooLarge",
    "UdpAssociation",
    "associate",
]
