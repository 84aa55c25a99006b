"""DNS over HTTPS (RFC 8484) with aiohttp, every connection made through the SOCKS5 proxy.

aiohttp has no public hook to open its connections through a SOCKS5 proxy of our own, so
``ProxiedConnector`` overrides ``TCPConnector._create_connection`` (the hook its own HTTP proxy
support goes through; present from aiohttp 3.0 to 3.14 at least, and covered by the DoH
integration test): it asks our SOCKS5 dialer for a socket to ``host:port`` (a name goes to the
proxy as ATYP=DOMAINNAME, so nothing is resolved locally) and runs TLS over that socket.
aiohttp keeps the connections alive and reuses them for later queries.

Queries are POSTed as ``application/dns-message`` with ID 0 (RFC 8484 section 4.1).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

import aiohttp

from .upstreams import REOPEN_GRACE, UpstreamError
from .urls import UpstreamUrl

if TYPE_CHECKING:
    import socket

DialHost = Callable[[str | IPv4Address | IPv6Address, int], Awaitable["socket.socket"]]
DNS_MESSAGE = "application/dns-message"
MAX_ANSWER = 65535


class ProxiedConnector(aiohttp.TCPConnector):
    """A TCPConnector whose connections are sockets from ``dial`` (our SOCKS5 client)."""

    def __init__(self, dial: DialHost, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(ssl=ssl_context, **kwargs)
        self._dial = dial
        self._ssl_context = ssl_context

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        host = req.url.raw_host
        port = req.port
        if host is None or port is None:
            raise UpstreamError(f"DoH URL without host or port: {req.url}")
        sock = await self._dial(host, port)
        tls = self._ssl_context if req.is_ssl() else None
        try:
            _, protocol = await self._loop.create_connection(
                self._factory,
                sock=sock,
                ssl=tls,
                server_hostname=host.rstrip(".") if tls is not None else None,
            )
        except BaseException:
            sock.close()
            raise
        return protocol


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate checks as usual; ``ca_file`` trusts a private CA instead of the system's."""
    return ssl.create_default_context(cafile=ca_file)


class DohUpstream:
    def __init__(self, url: UpstreamUrl, dial: DialHost, *, ca_file: str | None) -> None:
        self.label = str(url)
        self.url = str(url)
        self._dial = dial
        self._ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None
        self._closing: list[asyncio.Task[None]] = []

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running loop.
        if self._session is None:
            connector = ProxiedConnector(self._dial, tls_context(self._ca_file), limit=8)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),  # the forwarder's race cancels us
                headers={"accept": DNS_MESSAGE},
                trust_env=False,  # never an HTTP proxy from the environment
            )
        return self._session

    async def query(self, request: bytes) -> bytes:
        body = b"\x00\x00" + request[2:]
        try:
            async with self._client().post(
                self.url, data=body, headers={"content-type": DNS_MESSAGE}
            ) as response:
                if response.status != 200:
                    raise UpstreamError(f"HTTP status {response.status}")
                if response.content_type != DNS_MESSAGE:
                    raise UpstreamError(f"content type {response.content_type!r}")
                data = bytearray()
                async for chunk in response.content.iter_chunked(16384):
                    data += chunk
                    if len(data) > MAX_ANSWER:
                        raise UpstreamError("answer larger than a DNS message can be")
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from None
        return bytes(data)

    def reopen(self) -> None:
        """The next query opens a new session (new connections by the new path); the old one
        finishes what it carries and is closed after a grace period."""
        old, self._session = self._session, None
        if old is not None:
            asyncio.get_running_loop().call_later(REOPEN_GRACE, self._close_old, old)

    def _close_old(self, old: aiohttp.ClientSession) -> None:
        self._closing = [task for task in self._closing if not task.done()]
        self._closing.append(asyncio.get_running_loop().create_task(old.close()))

    async def close(self) -> None:
        for task in self._closing:
            await task
        if self._session is not None:
            await self._session.close()
