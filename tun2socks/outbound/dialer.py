"""How a TCP flow reaches its destination: the `Dialer` interface and the SOCKS5 dialer.

The engine asks a dialer for a connected socket for each new flow, and answers the
client's SYN with SYN-ACK if it gets one, or RST if the dialer raises.  Other ways out
(direct sockets, rules, DNS interception) are dialers too, wrapping this one.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from tun2socks.net.events import FlowRequested
from tun2socks.outbound import http_connect, socks5


class DialError(Exception):
    """A flow cannot be opened; its str is one log line (no secrets). ``kind``: the key under
    which the engine counts the refused flow, as ``Socks5Error.kind``."""

    kind = "dial_failed"


class Dialer(Protocol):
    async def dial(self, flow: FlowRequested) -> socket.socket:
        """A connected non-blocking socket for `flow`; raises DialError, Socks5Error or OSError."""
        ...


class HostDialer(Dialer, Protocol):
    async def dial_host(self, host: str | IPv4Address | IPv6Address, port: int) -> socket.socket:
        """A connected socket to `host` (an address, or a name the proxy resolves) and `port`."""
        ...


class Socks5Dialer:
    """Every flow through one proxy, to the address the client connected to: SOCKS5, or an
    HTTP proxy by CONNECT when ``proxy.scheme`` is "http" (same errors, same protection)."""

    def __init__(
        self,
        proxy: socks5.ProxyEndpoint,
        *,
        timeout: float,
        prepare_socket: Callable[[socket.socket], None] | None = None,
        pipeline: bool = True,
    ) -> None:
        self.proxy = proxy
        self.timeout = timeout
        self.prepare_socket = prepare_socket
        self.pipeline = pipeline  # False for servers that read one message per recv (microsocks)

    async def dial(self, flow: FlowRequested) -> socket.socket:
        return await self.dial_host(flow.dst, flow.dst_port)

    async def dial_host(self, host: str | IPv4Address | IPv6Address, port: int) -> socket.socket:
        """A connection to `host` (an address, or a name the proxy resolves) and `port`."""
        if self.proxy.scheme == "http":
            return await http_connect.connect(
                self.proxy, host, port, timeout=self.timeout, prepare_socket=self.prepare_socket
            )
        sock, _bound = await socks5.connect(
            self.proxy,
            host,
            port,
            timeout=self.timeout,
            pipeline=self.pipeline,
            prepare_socket=self.prepare_socket,
        )
        return sock
