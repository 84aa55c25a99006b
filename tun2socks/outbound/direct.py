"""Direct connections: a protected socket to the flow's destination that bypasses the TUN.

The Linux form of Android's ``VpnService.protect()``. With ``route.auto`` every route leads into
the TUN, so a plain socket opened here would come straight back to us. A protected socket does
not: ``SO_MARK`` (``route.mark``) makes the policy rule that ``tun2socks.host.routes`` adds ahead of
the TUN's rules send it through the main table; ``SO_BINDTODEVICE`` (``route.bind_interface``)
restricts its route lookup to the real interface. The same hook protects the sockets to the
proxy (passed to ``socks5.connect`` as ``prepare_socket``).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

from tun2socks.net.events import FlowRequested
from tun2socks.outbound.dialer import DialError, FirstDataOffer, Socks5Dialer
from tun2socks.outbound.socks5 import ProxyEndpoint, SocketHook, format_host_port

# linux/asm-generic/socket.h; the socket module has them on Linux with recent Pythons only.
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


AUTO_INTERFACE = "auto"  # route.bind_interface: the default route's interface at each socket


def protector(
    mark: int,
    interface: str | None,
    current_interface: Callable[[int], str | None] | None = None,
) -> SocketHook | None:
    """The hook that keeps a socket out of the TUN, or None when neither way is configured.

    With ``interface`` "auto", `current_interface(family)` names the interface to bind to
    when the socket is made (tun2socks.host.uplink.DefaultInterface.name): sockets follow
    the default route from one uplink to another."""
    if not mark and not interface:
        return None
    follow = interface == AUTO_INTERFACE
    if follow and current_interface is None:
        raise ValueError("bind_interface auto needs the current default interface")
    fixed = b"" if follow or not interface else interface.encode()

    def protect(sock: socket.socket) -> None:
        name = interface
        device = fixed
        if follow:
            assert current_interface is not None
            name = current_interface(sock.family)
            if name is None:
                raise OSError(errno.ENETUNREACH, "no default route: no interface to bind to")
            device = name.encode()
        try:
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            if device:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, device)
        except PermissionError:
            how = "SO_MARK" if mark else "SO_BINDTODEVICE"
            raise PermissionError(f"cannot set {how}: needs CAP_NET_ADMIN") from None
        except OSError as exc:
            if device and exc.errno == errno.ENODEV:
                raise OSError(exc.errno, f"no interface {name} to bind to") from None
            raise

    return protect


# A direct socket being connected without protection: destination, its port, our local port.
Connecting = tuple[IPv4Address | IPv6Address, int, int]


async def open_direct(
    host: IPv4Address | IPv6Address,
    port: int,
    *,
    timeout: float,
    protect: SocketHook | None,
    connecting: set[Connecting] | None = None,
) -> socket.socket:
    """A connected non-blocking TCP socket to host:port; raises DialError. Without `protect`,
    the socket is bound first and listed in `connecting` while it connects: if routes send it
    into the TUN, the flow it becomes is known by its source port (``BypassDialer.dial``)."""
    target = format_host_port(host, port)
    sock = socket.socket(socket.AF_INET6 if host.version == 6 else socket.AF_INET)
    listed: Connecting | None = None
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if protect is not None:
            protect(sock)
        elif connecting is not None:
            sock.bind(("::" if host.version == 6 else "0.0.0.0", 0))
            listed = (host, port, sock.getsockname()[1])
            connecting.add(listed)
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (str(host), port))
    except TimeoutError:
        sock.close()
        raise DialError(f"direct connection to {target} timed out after {timeout:g} s") from None
    except OSError as exc:
        sock.close()
        raise DialError(f"direct connection to {target} failed: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    finally:
        if listed is not None and connecting is not None:
            connecting.discard(listed)
    return sock


class DirectDialer:
    """Each flow straight to its destination on a protected socket."""

    def __init__(self, *, timeout: float, protect: SocketHook | None) -> None:
        self.timeout = timeout
        self.protect = protect
        self.connecting: set[Connecting] = set()  # unprotected sockets still connecting

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        # A direct connection is ready when connected: no reply for an offer to skip.
        return await self._open(flow.dst, flow.dst_port)

    async def dial_host(
        self,
        host: str | IPv4Address | IPv6Address,
        port: int,
        *,
        offer: FirstDataOffer | None = None,
    ) -> socket.socket:
        """To an address, or to a name resolved here (each of its addresses in turn)."""
        if not isinstance(host, str):
            return await self._open(host, port)
        try:
            address = ip_address(host)
        except ValueError:  # a name
            pass
        else:
            return await self._open(address, port)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise DialError(f"direct connection: cannot resolve {host}: {exc}") from None
        error = DialError(f"direct connection: {host} has no address")
        for *_, sockaddr in infos:
            try:
                return await self._open(ip_address(sockaddr[0]), port)
            except DialError as exc:
                error = exc
        raise error

    async def _open(self, host: IPv4Address | IPv6Address, port: int) -> socket.socket:
        return await open_direct(
            host, port, timeout=self.timeout, protect=self.protect, connecting=self.connecting
        )


class BypassDialer(Socks5Dialer):
    """The default "proxy" of ``direct://`` (the bypass mode): every flow and every DNS upstream
    connection straight to its destination on a protected socket, with no proxy at all. It
    stands where a proxy's dialer stands (rules, DNS and UDP read its ``proxy``, whose scheme is
    "direct"), so nothing around it needs to know."""

    def __init__(
        self, proxy: ProxyEndpoint, *, timeout: float, prepare_socket: SocketHook | None
    ) -> None:
        super().__init__(proxy, timeout=timeout, prepare_socket=prepare_socket)
        self.direct = DirectDialer(timeout=timeout, protect=prepare_socket)

    async def dial(
        self, flow: FlowRequested, *, offer: FirstDataOffer | None = None
    ) -> socket.socket:
        # Without route.mark / route.bind_interface our own socket may be routed into the TUN
        # (route.auto refuses that; routes made by hand may do it): it arrives as a new flow
        # from the port it is connecting from, and dialing it again would loop until the
        # limits stop it. Refused at once instead: the outer connection fails too.
        if (flow.dst, flow.dst_port, flow.src_port) in self.direct.connecting:
            raise DialError(
                "refused: a direct connection of tun2socks itself entered the TUN (route its "
                "destinations around the TUN, or set route.mark or route.bind_interface)"
            )
        return await self.direct.dial(flow)

    async def dial_host(
        self,
        host: str | IPv4Address | IPv6Address,
        port: int,
        *,
        offer: FirstDataOffer | None = None,
    ) -> socket.socket:
        return await self.direct.dial_host(host, port)
